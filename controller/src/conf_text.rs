//! Writing values into valkey.conf and sentinel.conf so that none can start a new directive:
//! what the operator generates (paths, passwords, module paths and arguments) is quoted the way
//! Valkey's config parser reads quotes, and what the user writes (customConfigs) is checked by
//! [`crate::validate`] to hold no control character, so that no value can break a line.

/// `value` as one double-quoted config argument: `\` and `"` escaped, and every byte that is
/// not printable ASCII written as `\xHH`, which Valkey's parser (`sdssplitargs`) turns back
/// into the same bytes.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for byte in value.bytes() {
        match byte {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b' '..=b'~' => out.push(char::from(byte)),
            _ => out.push_str(&format!("\\x{byte:02x}")),
        }
    }
    out.push('"');
    out
}

/// Whether `text` holds a control character (a newline among them): such a text could end
/// the config line it is written on.
pub fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_value_stays_on_its_line_and_reads_back_the_same() {
        let nasty = "a\"b\\c\nrequirepass x\r\u{7f}é";
        let quoted = quote(nasty);
        assert!(!has_control(&quoted), "{quoted}");
        assert_eq!(
            quoted,
            "\"a\\\"b\\\\c\\x0arequirepass x\\x0d\\x7f\\xc3\\xa9\""
        );
        assert!(has_control(nasty));
        assert!(!has_control("allkeys-lru"));
    }
}

//! Log lines about clients not yet trusted: at a bounded rate, and with what they sent
//! escaped, so that a flood cannot flood the log nor forge lines in it.

use std::time::{Duration, Instant};

/// At most one log line a second for something a flood can repeat.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// Counts one more; Some(how many since the last line, this one included) when a line
    /// may be written now.
    pub fn hit(&mut self) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}

/// `text` as a log field from someone not yet trusted: at most 64 characters, with control
/// characters (newlines, ANSI escapes) and quotes escaped.
pub fn untrusted(text: &str) -> String {
    let mut shown: String = text.chars().take(64).flat_map(char::escape_debug).collect();
    if text.chars().nth(64).is_some() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_cannot_forge_a_line_or_fill_one() {
        let forged = "demo-0\n2026-12-07T00:00:00Z  INFO agent connected \u{1b}[2J";
        let shown = untrusted(forged);
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(
            shown.contains("\\n") && shown.contains("\\u{1b}"),
            "{shown}"
        );
        let long = untrusted(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), 65, "{long}");
        assert_eq!(untrusted("demo-0"), "demo-0");
    }

    #[test]
    fn a_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.hit(), Some(1));
        for _ in 0..999 {
            assert_eq!(throttle.hit(), None);
        }
        throttle.last = throttle
            .last
            .and_then(|at| at.checked_sub(Duration::from_secs(1)));
        assert_eq!(throttle.hit(), Some(1000));
    }
}

//! The spec checks, each refusal naming its field.
use super::*;
use crate::crd::{InstanceAccess, SentinelMonitorNode, SentinelReference};

fn spec() -> FailoverSpec {
    FailoverSpec {
        replicas: 3,
        ..FailoverSpec::default()
    }
}

fn field_of(spec: &FailoverSpec) -> String {
    validate("demo", spec).expect_err("invalid").field
}

#[test]
fn quantities_and_sizes() {
    assert_eq!(parse_quantity("512Mi"), Some(512.0 * 1024.0 * 1024.0));
    assert_eq!(parse_quantity("250m"), Some(0.25));
    assert_eq!(parse_quantity("1e3"), Some(1000.0));
    assert_eq!(parse_quantity("2"), Some(2.0));
    for bad in ["", "1Gb", "lots", "1.2.3Mi", "-1Gi"] {
        assert_eq!(parse_quantity(bad), None, "{bad}");
    }
    assert_eq!(parse_memory("100mb"), Some(100 * 1024 * 1024));
    assert_eq!(parse_memory("1GB"), Some(1024 * 1024 * 1024));
    assert_eq!(parse_memory("1mib"), None);
}

#[test]
fn a_good_spec_passes() {
    assert_eq!(validate("demo", &spec()), Ok(()));
    let mut node_port = spec();
    node_port.access = InstanceAccess {
        service_type: ServiceType::NodePort,
        ports: Some("30001,30002-30003".into()),
        ..InstanceAccess::default()
    };
    assert_eq!(node_port_pool(&node_port), Ok(vec![30001, 30002, 30003]));
}

#[test]
fn a_sentinel_node_port_pool_holds_one_port_per_sentinel_none_of_the_data_pools() {
    let with_pools = |data: &str, sentinels: &str| {
        let mut s = spec();
        s.access = InstanceAccess {
            service_type: ServiceType::NodePort,
            ports: Some(data.into()),
            ..InstanceAccess::default()
        };
        s.sentinel = Some(SentinelSettings {
            access: Some(crate::crd::SentinelInstanceAccess {
                access: InstanceAccess {
                    service_type: ServiceType::NodePort,
                    ports: Some(sentinels.into()),
                    ..InstanceAccess::default()
                },
                ..Default::default()
            }),
            ..SentinelSettings::default()
        });
        s
    };
    let good = with_pools("30001-30003", "30011-30013");
    assert_eq!(validate("demo", &good), Ok(()));
    assert_eq!(
        sentinel_node_port_pool(&good),
        Ok(vec![30011, 30012, 30013])
    );
    for (bad, says) in [
        (
            with_pools("30001-30003", "30011-30012"),
            "one port per pod: 2 port(s) for 3",
        ),
        (
            with_pools("30001-30003", "30003,30011,30012"),
            "port 30003 is in spec.access.ports too",
        ),
    ] {
        let err = validate("demo", &bad).expect_err("refused");
        assert_eq!(err.field, "spec.sentinel.access.ports", "{err:?}");
        assert!(err.to_string().contains(says), "{err}");
    }
}

// A table of cases.
#[allow(clippy::too_many_lines)]
#[test]
fn errors_name_the_field() {
    let mut cases: Vec<(FailoverSpec, &str)> = Vec::new();
    let mut s = spec();
    s.replicas = 0;
    cases.push((s, "spec.replicas"));
    let mut s = spec();
    s.replicas = 10;
    cases.push((s, "spec.replicas"));
    let mut s = spec();
    s.custom_configs.insert("requirepass".into(), "x".into());
    cases.push((s, "spec.customConfigs.requirepass"));
    let mut s = spec();
    s.custom_configs.insert("TLS-port".into(), "1".into());
    cases.push((s, "spec.customConfigs.TLS-port"));
    let mut s = spec();
    s.custom_configs.insert("maxmemory".into(), "lots".into());
    cases.push((s, "spec.customConfigs.maxmemory"));
    // Upper case, an alias of an owned key, an alias of a free one, and values Valkey would
    // refuse to load.
    for (key, value) in [
        ("MaxMemory", "lots"),
        ("primaryauth", "x"),
        ("primaryuser", "x"),
        ("slave-priority", "10"),
        ("save", "'900 1"),
        ("save", "\"900 1\"x"),
        ("appendonly", "true"),
        ("maxmemory-policy", "#"),
        ("hz", " "),
    ] {
        let mut s = spec();
        s.custom_configs.insert(key.into(), value.into());
        cases.push((
            s,
            Box::leak(format!("spec.customConfigs.{key}").into_boxed_str()),
        ));
    }
    // Sentinels: keys that touch the filesystem or that the sentinels own, and aliases of them.
    for key in [
        "unixsocket",
        "unixsocketperm",
        "aclfile",
        "masterauth",
        "primaryauth",
        "tls-port",
        "cluster-enabled",
    ] {
        let mut s = spec();
        s.sentinel = Some(crate::crd::SentinelSettings {
            custom_configs: [(key.to_owned(), "/tmp/x".to_owned())].into(),
            ..Default::default()
        });
        cases.push((
            s,
            Box::leak(format!("spec.sentinel.customConfigs.{key}").into_boxed_str()),
        ));
    }
    let mut s = spec();
    s.sentinel = Some(crate::crd::SentinelSettings {
        sentinel_reference: Some(crate::crd::SentinelReference {
            nodes: (0..3)
                .map(|i| crate::crd::SentinelMonitorNode {
                    ip: if i == 1 {
                        "10.0.0.1 evil".into()
                    } else {
                        "10.0.0.1".into()
                    },
                    port: 26379,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.sentinelReference.nodes[1].ip"));
    let mut s = spec();
    s.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        limits: Some(
            [(
                "memory".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gb".into()),
            )]
            .into(),
        ),
        ..Default::default()
    });
    cases.push((s, "spec.resources.limits.memory"));
    let mut s = spec();
    s.storage = Some(crate::crd::Storage {
        capacity: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "ten gigs".into(),
        )),
        ..Default::default()
    });
    cases.push((s, "spec.storage.capacity"));
    for ports in [
        "30001,30002",
        "30001-30004",
        "30001,30001,30002",
        "x",
        "30003-30001",
    ] {
        let mut s = spec();
        s.access.service_type = ServiceType::NodePort;
        s.access.ports = Some(ports.into());
        cases.push((s, "spec.access.ports"));
    }
    let mut s = spec();
    s.access.ports = Some("30001-30003".into());
    cases.push((s, "spec.access.ports"));
    for replicas in [1, 4, 11, i32::MAX] {
        let mut s = spec();
        s.sentinel = Some(SentinelSettings {
            replicas: Some(replicas),
            ..Default::default()
        });
        cases.push((s, "spec.sentinel.replicas"));
    }
    for quorum in [0, 4] {
        let mut s = spec();
        s.sentinel = Some(SentinelSettings {
            quorum: Some(quorum),
            ..Default::default()
        });
        cases.push((s, "spec.sentinel.quorum"));
    }
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        monitor_config: [("down-after".to_owned(), "1".to_owned())].into(),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.monitorConfig.down-after"));
    // Sooner than a cut-off master fences itself.
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        monitor_config: [("down-after-milliseconds".to_owned(), "1999".to_owned())].into(),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.monitorConfig.down-after-milliseconds"));
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        sentinel_reference: Some(SentinelReference {
            nodes: vec![SentinelMonitorNode {
                ip: "a".into(),
                port: 1,
                flags: None,
            }],
            auth: None,
        }),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.sentinelReference.nodes"));
    // At most 9 sentinels in a reference (a 1,000-node one took the controller to 210 MB).
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        sentinel_reference: Some(SentinelReference {
            nodes: (0..10)
                .map(|i| SentinelMonitorNode {
                    ip: format!("10.0.0.{i}"),
                    port: 26379,
                    flags: None,
                })
                .collect(),
            auth: None,
        }),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.sentinelReference.nodes"));
    let mut s = spec();
    let mut sentinel_access = crate::crd::SentinelInstanceAccess::default();
    sentinel_access.access.enable_tls = true;
    s.sentinel = Some(SentinelSettings {
        access: Some(sentinel_access),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.access.enableTLS"));
    // Text that ends up in config lines: nothing may start a new directive.
    let injected = "allkeys-lru\nrequirepass x\ndir /etc";
    let mut s = spec();
    s.custom_configs
        .insert("maxmemory-policy".into(), injected.into());
    cases.push((s, "spec.customConfigs.maxmemory-policy"));
    let mut s = spec();
    s.custom_configs
        .insert("maxmemory-policy".into(), "x".repeat(MAX_VALUE_LEN + 1));
    cases.push((s, "spec.customConfigs.maxmemory-policy"));
    let mut s = spec();
    s.custom_configs.insert("a\nb".into(), "1".into());
    cases.push((s, "spec.customConfigs.\"a\\nb\""));
    for (key, _) in REFUSED_KEYS {
        let mut s = spec();
        s.custom_configs.insert((*key).into(), "yes".into());
        cases.push((s, format!("spec.customConfigs.{key}").leak()));
    }
    let mut s = spec();
    s.modules.push(crate::crd::ValkeyModule {
        path: "valkey-json".into(),
        args: vec!["a\nrename-command CONFIG \"\"".into()],
    });
    cases.push((s, "spec.modules[0].args[0]"));
    for path in ["../../tmp/evil", "a b", "x\ny"] {
        let mut s = spec();
        s.modules.push(crate::crd::ValkeyModule {
            path: path.into(),
            args: vec![],
        });
        cases.push((s, "spec.modules[0].path"));
    }
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        custom_configs: [(
            "x\nsentinel deny-scripts-reconfig no".to_owned(),
            "1".to_owned(),
        )]
        .into(),
        ..Default::default()
    });
    cases.push((
        s,
        "spec.sentinel.customConfigs.\"x\\nsentinel deny-scripts-reconfig no\"",
    ));
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        custom_configs: [(
            "loglevel".to_owned(),
            "notice\nsentinel deny-scripts-reconfig no".to_owned(),
        )]
        .into(),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.customConfigs.loglevel"));
    let mut s = spec();
    s.sentinel = Some(SentinelSettings {
        custom_configs: [("tls-port".to_owned(), "1".to_owned())].into(),
        ..Default::default()
    });
    cases.push((s, "spec.sentinel.customConfigs.tls-port"));
    let mut s = spec();
    s.pod_annotations.insert("bad key!".into(), "v".into());
    cases.push((s, "spec.podAnnotations.\"bad key!\""));
    let mut s = spec();
    s.pod_annotations
        .insert("big".into(), "x".repeat(text::MAX_ANNOTATIONS_BYTES));
    cases.push((s, "spec.podAnnotations"));
    let mut s = spec();
    s.node_selector.insert("zone".into(), "a b".into());
    cases.push((s, "spec.nodeSelector.zone"));
    let mut s = spec();
    s.access.annotations.insert("/x".into(), "v".into());
    cases.push((s, "spec.access.annotations.\"/x\""));
    let mut s = spec();
    s.image = Some("valkey/valkey:8.0 --evil".into());
    cases.push((s, "spec.image"));
    let mut s = spec();
    s.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        limits: Some(
            [(
                "memory".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    "99999999999999999999999Ei".into(),
                ),
            )]
            .into(),
        ),
        ..Default::default()
    });
    cases.push((s, "spec.resources.limits.memory"));
    // Names of other objects: never a path, never a second line.
    for bad in ["../../etc", "a/b", "ca\nrequirepass x", "Upper", "", "-a"] {
        let nodes = (0..3)
            .map(|i| SentinelMonitorNode {
                ip: "10.0.0.1".into(),
                port: 26379 + i,
                flags: None,
            })
            .collect();
        let mut s = spec();
        s.sentinel = Some(SentinelSettings {
            sentinel_reference: Some(SentinelReference {
                nodes,
                auth: Some(crate::crd::Authorization {
                    tls_secret: Some(bad.into()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        });
        cases.push((s, "spec.sentinel.sentinelReference.auth.tlsSecret"));
        let mut s = spec();
        s.sentinel = Some(SentinelSettings {
            access: Some(crate::crd::SentinelInstanceAccess {
                external_tls_secret: Some(bad.into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        cases.push((s, "spec.sentinel.access.externalTLSSecret"));
        let mut s = spec();
        s.access.cert_issuer = Some(bad.into());
        cases.push((s, "spec.access.certIssuer"));
    }
    for (spec, field) in cases {
        assert_eq!(field_of(&spec), field, "{spec:?}");
    }
    assert_eq!(
        validate("Demo_1", &spec()).expect_err("name").field,
        "metadata.name"
    );
}

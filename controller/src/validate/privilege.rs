//! Pod and container settings that would give whoever may create a Failover more than the
//! pods need: root, privileged mode, added capabilities, an unconfined seccomp or AppArmor
//! profile, host namespaces, unsafe sysctls. They are refused unless the controller runs with
//! `--allow-privileged-pods`, so that the right to create a Failover is not the right to run
//! privileged pods.

use k8s_openapi::api::core::v1::{PodSecurityContext, SELinuxOptions, SecurityContext};

use super::{Invalid, invalid};
use crate::crd::FailoverSpec;

/// What the controller admits beyond the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    /// `--allow-privileged-pods`: the settings this module refuses are passed through.
    pub allow_privileged: bool,
}

/// Sysctls the Kubernetes baseline Pod Security level allows: namespaced, and safe.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// SELinux types the baseline level allows.
const SAFE_SELINUX_TYPES: &[&str] = &["container_t", "container_init_t", "container_kvm_t"];

const OPT_IN: &str = "refused unless the controller runs with --allow-privileged-pods";

fn refuse(field: String, what: &str) -> Invalid {
    invalid(field, format!("{what}: {OPT_IN}"))
}

/// Every security setting the spec passes to pods.
pub fn check(spec: &FailoverSpec, admission: Admission) -> Result<(), Invalid> {
    if admission.allow_privileged {
        return Ok(());
    }
    if let Some(pod) = &spec.security_context {
        check_pod("spec.securityContext", pod)?;
    }
    if let Some(container) = spec
        .exporter
        .as_ref()
        .and_then(|e| e.security_context.as_ref())
    {
        check_container("spec.exporter.securityContext", container)?;
    }
    if let Some(sentinel) = &spec.sentinel {
        if let Some(pod) = &sentinel.security_context {
            check_pod("spec.sentinel.securityContext", pod)?;
        }
        if let Some(container) = sentinel
            .exporter
            .as_ref()
            .and_then(|e| e.security_context.as_ref())
        {
            check_container("spec.sentinel.exporter.securityContext", container)?;
        }
    }
    Ok(())
}

fn check_user(
    field: &str,
    run_as_user: Option<i64>,
    run_as_non_root: Option<bool>,
) -> Result<(), Invalid> {
    if run_as_user == Some(0) {
        return Err(refuse(format!("{field}.runAsUser"), "0 runs as root"));
    }
    if run_as_non_root == Some(false) {
        return Err(refuse(
            format!("{field}.runAsNonRoot"),
            "false allows running as root",
        ));
    }
    Ok(())
}

fn check_seccomp(
    field: &str,
    profile: Option<&k8s_openapi::api::core::v1::SeccompProfile>,
) -> Result<(), Invalid> {
    match profile {
        Some(p) if p.type_ == "Unconfined" => Err(refuse(
            format!("{field}.seccompProfile.type"),
            "Unconfined lifts the syscall filter",
        )),
        _ => Ok(()),
    }
}

fn check_app_armor(
    field: &str,
    profile: Option<&k8s_openapi::api::core::v1::AppArmorProfile>,
) -> Result<(), Invalid> {
    match profile {
        Some(p) if p.type_ == "Unconfined" => Err(refuse(
            format!("{field}.appArmorProfile.type"),
            "Unconfined lifts the AppArmor profile",
        )),
        _ => Ok(()),
    }
}

fn check_selinux(field: &str, options: Option<&SELinuxOptions>) -> Result<(), Invalid> {
    let Some(options) = options else {
        return Ok(());
    };
    match options.type_.as_deref() {
        Some(t) if !SAFE_SELINUX_TYPES.contains(&t) => Err(refuse(
            format!("{field}.seLinuxOptions.type"),
            &format!("{t:?} is not a container type"),
        )),
        _ if options.user.is_some() || options.role.is_some() => Err(refuse(
            format!("{field}.seLinuxOptions"),
            "a custom SELinux user or role",
        )),
        _ => Ok(()),
    }
}

fn check_host_process(
    field: &str,
    windows: Option<&k8s_openapi::api::core::v1::WindowsSecurityContextOptions>,
) -> Result<(), Invalid> {
    if windows.and_then(|w| w.host_process) == Some(true) {
        return Err(refuse(
            format!("{field}.windowsOptions.hostProcess"),
            "true runs in the host's namespaces",
        ));
    }
    Ok(())
}

fn check_pod(field: &str, pod: &PodSecurityContext) -> Result<(), Invalid> {
    check_user(field, pod.run_as_user, pod.run_as_non_root)?;
    check_seccomp(field, pod.seccomp_profile.as_ref())?;
    check_app_armor(field, pod.app_armor_profile.as_ref())?;
    check_selinux(field, pod.se_linux_options.as_ref())?;
    check_host_process(field, pod.windows_options.as_ref())?;
    for (i, sysctl) in pod.sysctls.iter().flatten().enumerate() {
        if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
            return Err(refuse(
                format!("{field}.sysctls[{i}]"),
                &format!("{:?} is not a safe sysctl", sysctl.name),
            ));
        }
    }
    Ok(())
}

fn check_container(field: &str, container: &SecurityContext) -> Result<(), Invalid> {
    if container.privileged == Some(true) {
        return Err(refuse(format!("{field}.privileged"), "true"));
    }
    if container.allow_privilege_escalation == Some(true) {
        return Err(refuse(format!("{field}.allowPrivilegeEscalation"), "true"));
    }
    check_user(field, container.run_as_user, container.run_as_non_root)?;
    if let Some(added) = container
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .filter(|a| !a.is_empty())
    {
        return Err(refuse(
            format!("{field}.capabilities.add"),
            &format!("adding {}", added.join(", ")),
        ));
    }
    if container.proc_mount.as_deref() == Some("Unmasked") {
        return Err(refuse(
            format!("{field}.procMount"),
            "Unmasked exposes the host's /proc",
        ));
    }
    check_seccomp(field, container.seccomp_profile.as_ref())?;
    check_app_armor(field, container.app_armor_profile.as_ref())?;
    check_selinux(field, container.se_linux_options.as_ref())?;
    check_host_process(field, container.windows_options.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Exporter;
    use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile, Sysctl};

    fn with_exporter(container: SecurityContext) -> FailoverSpec {
        FailoverSpec {
            replicas: 3,
            exporter: Some(Exporter {
                security_context: Some(container),
                ..Exporter::default()
            }),
            ..FailoverSpec::default()
        }
    }

    fn with_pod(pod: PodSecurityContext) -> FailoverSpec {
        FailoverSpec {
            replicas: 3,
            security_context: Some(pod),
            ..FailoverSpec::default()
        }
    }

    fn refused_field(spec: &FailoverSpec) -> String {
        match check(spec, Admission::default()) {
            Err(e) => {
                assert!(e.message.contains("--allow-privileged-pods"), "{e}");
                e.field
            }
            Ok(()) => panic!("admitted: {spec:?}"),
        }
    }

    #[test]
    fn privileged_settings_are_refused_naming_the_field_unless_opted_in() {
        let cases = [
            (
                with_exporter(SecurityContext {
                    privileged: Some(true),
                    ..SecurityContext::default()
                }),
                "spec.exporter.securityContext.privileged",
            ),
            (
                with_exporter(SecurityContext {
                    capabilities: Some(Capabilities {
                        add: Some(vec!["SYS_ADMIN".into()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                "spec.exporter.securityContext.capabilities.add",
            ),
            (
                with_exporter(SecurityContext {
                    run_as_user: Some(0),
                    ..SecurityContext::default()
                }),
                "spec.exporter.securityContext.runAsUser",
            ),
            (
                with_exporter(SecurityContext {
                    allow_privilege_escalation: Some(true),
                    ..SecurityContext::default()
                }),
                "spec.exporter.securityContext.allowPrivilegeEscalation",
            ),
            (
                with_pod(PodSecurityContext {
                    run_as_user: Some(0),
                    ..PodSecurityContext::default()
                }),
                "spec.securityContext.runAsUser",
            ),
            (
                with_pod(PodSecurityContext {
                    seccomp_profile: Some(SeccompProfile {
                        type_: "Unconfined".into(),
                        ..SeccompProfile::default()
                    }),
                    ..PodSecurityContext::default()
                }),
                "spec.securityContext.seccompProfile.type",
            ),
            (
                with_pod(PodSecurityContext {
                    app_armor_profile: Some(k8s_openapi::api::core::v1::AppArmorProfile {
                        type_: "Unconfined".into(),
                        ..Default::default()
                    }),
                    ..PodSecurityContext::default()
                }),
                "spec.securityContext.appArmorProfile.type",
            ),
            (
                with_exporter(SecurityContext {
                    app_armor_profile: Some(k8s_openapi::api::core::v1::AppArmorProfile {
                        type_: "Unconfined".into(),
                        ..Default::default()
                    }),
                    ..SecurityContext::default()
                }),
                "spec.exporter.securityContext.appArmorProfile.type",
            ),
            (
                with_pod(PodSecurityContext {
                    sysctls: Some(vec![Sysctl {
                        name: "kernel.msgmax".into(),
                        value: "1".into(),
                    }]),
                    ..PodSecurityContext::default()
                }),
                "spec.securityContext.sysctls[0]",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(refused_field(&spec), field);
            let opted_in = Admission {
                allow_privileged: true,
            };
            assert_eq!(check(&spec, opted_in), Ok(()), "{field} with the opt-in");
        }
        // What the restricted level allows passes.
        let fine = with_pod(PodSecurityContext {
            run_as_user: Some(1000),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            sysctls: Some(vec![Sysctl {
                name: "net.ipv4.tcp_keepalive_time".into(),
                value: "60".into(),
            }]),
            ..PodSecurityContext::default()
        });
        assert_eq!(check(&fine, Admission::default()), Ok(()));
    }
}

//! What `local up` keeps from other users of the machine and from misbehaving clients: its
//! working dir and control socket, a control socket client that says nothing, a state write
//! that fails, and passwords in logs.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    time::Duration,
};

use nix::sys::signal::Signal;
use valkey_e2e::{
    local::{LocalInstance, Writer, alive, manifest, master_of, missing_on, signal, write_n},
    wait_for,
};

const T: Duration = Duration::from_secs(30);

/// Every file and dir under `dir` whose mode lets anyone but its owner in.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed meanwhile (a temp file renamed into place)
        };
        if meta.permissions().mode() & 0o077 != 0 {
            found.push(format!(
                "{} {:o}",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            pending.extend(entries.filter_map(|e| Some(e.ok()?.path())));
        }
    }
    found
}

#[tokio::test]
async fn under_umask_000_the_working_dir_its_files_and_the_control_socket_are_the_owners_alone() {
    // The caller's umask lets everyone in; nextest runs each test in a process of its own.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let instance = LocalInstance::up(&manifest(2));
    let status = instance.wait_healthy(2, T).await;
    let (_, addr, _) = master_of(&status);
    write_n(&instance, &addr, 10, 1).await;

    let dir_mode = std::fs::metadata(&instance.dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "the working dir");
    let socket = instance.dir.join("control.sock");
    let socket_mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(socket_mode & 0o777, 0o600, "the control socket");
    // Configs with passwords, AOF files, logs: written by the controller and by Valkey. The
    // test's own capture of `local up`'s output (controller.N.log) is the caller's file.
    let open: Vec<String> = open_to_others(&instance.dir)
        .into_iter()
        .filter(|f| !f.contains("/controller.0.log "))
        .collect();
    assert!(open.is_empty(), "open to other users: {open:#?}");

    // Tried as another user when the test can be one (CI runs as root).
    if !nix::unistd::getuid().is_root() {
        eprintln!("not root: skipping the reads as user nobody");
        return;
    }
    for target in [
        instance.dir.join("password"),
        instance.dir.join("state.json"),
    ] {
        let read = std::process::Command::new("cat")
            .arg(&target)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("cat");
        assert!(
            !read.status.success(),
            "user nobody read {}",
            target.display()
        );
    }
    let connect = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3<>{}", socket.display()))
        .uid(65534)
        .gid(65534)
        .output()
        .expect("sh");
    assert!(
        !connect.status.success(),
        "user nobody opened the control socket"
    );
}

#[tokio::test]
async fn clients_that_hold_the_control_socket_idle_delay_neither_status_nor_failover() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (old, addr, pid) = master_of(&before);
    write_n(&instance, &addr, 20, 2).await;

    // Clients that connect and say nothing, 20 a second, for as long as the test runs.
    let socket = instance.dir.join("control.sock");
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connected.clone();
    let idle = tokio::spawn(async move {
        let mut held = std::collections::VecDeque::new();
        loop {
            if let Ok(stream) = tokio::net::UnixStream::connect(&socket).await {
                held.push_back(stream);
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            // Each one stays until the runtime gives up on it.
            if held.len() > 500 {
                held.pop_front();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    wait_for("40 idle clients", T, || async {
        (connected.load(std::sync::atomic::Ordering::SeqCst) >= 40).then_some(())
    })
    .await;

    // Status answers, and the killed master is replaced, with the idle clients still there.
    instance.wait_healthy(3, T).await;
    signal(pid, Signal::SIGKILL);
    let after = instance.wait_new_master(&old).await;
    assert_eq!(after.epoch, before.epoch + 1);
    idle.abort();
}

#[tokio::test]
async fn a_state_write_that_fails_is_retried_and_stops_no_process() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (old, _, pid) = master_of(&before);
    let writer = Writer::start(instance.dir.clone(), 1);
    writer.wait_more(100).await;

    // The state file's temp file cannot be created (a dir in its place: even root fails),
    // as when the disk is full or no file descriptor is left.
    let blocker = instance.dir.join("state.tmp");
    std::fs::create_dir(&blocker).unwrap();
    signal(pid, Signal::SIGKILL);
    let log = instance.dir.join("controller.0.log");
    wait_for("the failed state write in the log", T, || async {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("reconcile failed; retrying")
            .then_some(())
    })
    .await;
    // Nothing was promoted without its record, and nothing was stopped.
    let stuck = instance.try_status().await.expect("local up still answers");
    assert_eq!(stuck.epoch, before.epoch);
    assert_eq!(stuck.master.as_deref(), Some(old.as_str()));
    for node in before.nodes.iter().filter(|n| n.pod != old) {
        let pid = node.valkey_pid.expect("pid");
        assert!(alive(pid), "{} was stopped", node.pod);
    }

    // Once the state can be written again the failover goes through, losing nothing.
    std::fs::remove_dir(&blocker).unwrap();
    let after = instance.wait_new_master(&old).await;
    assert_eq!(after.epoch, before.epoch + 1);
    writer.wait_more(100).await;
    let healed = instance.wait_healthy(3, T).await;
    let acked = writer.finish().await;
    let (_, addr, _) = master_of(&healed);
    assert_eq!(
        missing_on(&instance, &addr, &acked).await,
        Vec::<u64>::new(),
        "acknowledged writes lost"
    );
}

#[tokio::test]
async fn at_debug_level_no_log_holds_a_password_through_a_rotation_and_a_sentinel_failover() {
    // Policy sentinel: the monitor's commands carry the instance password (auth-pass), the
    // sentinels have one of their own, and a rotation sends both sides of it.
    let instance = LocalInstance::up_logging(&valkey_e2e::soak::manifest(true), "debug");
    let healthy =
        |s: &valkey_controller::local::control::Status| valkey_e2e::soak::healthy(s, true);
    instance.wait_status("a healthy instance", T, healthy).await;
    let first = instance.password();
    let sentinel_password = instance.sentinel_password().expect("a sentinel password");
    instance.rotate_password().await;
    let status = instance
        .wait_status("healthy after the rotation", T, healthy)
        .await;
    let second = instance.password();
    let (old, addr, pid) = master_of(&status);
    write_n(&instance, &addr, 20, 2).await;
    signal(pid, Signal::SIGKILL);
    instance.wait_new_master(&old).await;
    instance.wait_status("healthy again", T, healthy).await;

    let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(instance.dir.join("logs"))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    logs.push(instance.dir.join("controller.0.log"));
    let mut debug_lines = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        debug_lines += text.matches(" DEBUG ").count();
        for password in [&first, &second, &sentinel_password] {
            assert!(
                !text.contains(password.as_str()),
                "{} holds a password",
                log.display()
            );
        }
    }
    assert!(debug_lines > 0, "the logs were not at debug level");
}

/// The hub's address, from `local up`'s log line announcing the instance.
fn hub_addr(instance: &LocalInstance) -> std::net::SocketAddr {
    let log = std::fs::read_to_string(instance.dir.join("controller.0.log")).unwrap();
    log.split_whitespace()
        .find_map(|word| word.strip_prefix("hub=")?.parse().ok())
        .expect("the hub's address in the log")
}

#[tokio::test]
async fn under_a_flood_of_idle_connections_and_large_hellos_agents_stay_and_failover_works() {
    let fds = valkey_e2e::flood::raise_fd_limit();
    let idle = 2000.min(fds.saturating_sub(400) as usize);
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (old, addr, pid) = master_of(&before);
    write_n(&instance, &addr, 20, 2).await;

    let ca = std::fs::read_to_string(instance.dir.join("tls").join("ca.crt")).unwrap();
    let flood = valkey_e2e::flood::Flood::start(hub_addr(&instance), ca, idle, 80);
    wait_for("the flood to be under way", T, || async {
        let c = &flood.counts;
        let (connections, streams) = (
            c.connections.load(std::sync::atomic::Ordering::Relaxed),
            c.streams.load(std::sync::atomic::Ordering::Relaxed),
        );
        eprintln!("flood: {connections} connections, {streams} streams");
        (connections >= idle as u64 && streams >= 80).then_some(())
    })
    .await;

    // A killed master is replaced, and the old one's agent (restarted with it) is let in.
    signal(pid, Signal::SIGKILL);
    let after = instance.wait_new_master(&old).await;
    assert_eq!(after.epoch, before.epoch + 1);
    // An agent killed now comes back and reconnects through the flood.
    let replica = after
        .nodes
        .iter()
        .find(|n| Some(&n.pod) != after.master.as_ref())
        .expect("a replica")
        .clone();
    signal(replica.agent_pid.expect("agent pid"), Signal::SIGKILL);
    instance
        .wait_status("the killed agent back and connected", T, |s| {
            s.nodes
                .iter()
                .any(|n| n.pod == replica.pod && n.agent_pid != replica.agent_pid && n.connected)
        })
        .await;
    instance.wait_healthy(3, T).await;
    drop(flood);
}

/// Runs `local up` on `dir` and returns its failure text (it must refuse).
fn refused(dir: &Path) -> String {
    let base = dir.parent().unwrap();
    let file = base.join("failover.yaml");
    std::fs::write(&file, manifest(2)).unwrap();
    let out = LocalInstance::command(&file, dir)
        .output()
        .expect("run local up");
    assert!(!out.status.success(), "local up took {}", dir.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Another user's working dir, or one where another user planted a link (to make the runtime
/// write through it, or read a password back), is refused before anything is written, naming
/// the path; the file the link points to is untouched. Needs root (to act as another user);
/// without it the test says so and passes.
#[test]
fn a_working_dir_that_another_user_owns_or_planted_a_link_in_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // A dir another user made.
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, nobody, None).unwrap();
    let err = refused(&theirs);
    assert!(
        err.contains(&theirs.display().to_string()) && err.contains("owned by another user"),
        "{err}"
    );

    // Our dir, once open to others, where another user planted links to a file of ours.
    let victim = base.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let ours = base.path().join("ours");
    std::fs::create_dir_all(ours.join("logs")).unwrap();
    for name in ["state.json", "logs/controller.log", "sentinel-password"] {
        let link = ours.join(name);
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
    }
    let err = refused(&ours);
    assert!(err.contains("made by another user"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // A parent another user can write to (not sticky): they could swap the dir.
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    nix::unistd::chown(&open, nobody, None).unwrap();
    let err = refused(&open.join("dir"));
    assert!(
        err.contains(&open.display().to_string()) && err.contains("parent"),
        "{err}"
    );
}

/// With the agents' shared token read from the working dir, a Hello for a pod the runtime
/// does not run, or for another instance, is refused: the hub keeps no made-up pods.
#[tokio::test]
async fn the_shared_token_admits_only_the_runtimes_own_pods() {
    let instance = LocalInstance::up(&manifest(2));
    instance.wait_healthy(2, T).await;
    let token = std::fs::read_to_string(instance.dir.join("agent-token")).unwrap();
    let ca = std::fs::read_to_string(instance.dir.join("tls").join("ca.crt")).unwrap();
    let hub = hub_addr(&instance);
    for (failover, pod) in [("demo", "demo-fake-99"), ("other", "demo-0")] {
        let channel = valkey_e2e::flood::hub_channel(hub, &ca).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(valkey_proto::v1::AgentMessage {
            msg: Some(valkey_proto::v1::agent_message::Msg::Hello(
                valkey_proto::v1::Hello {
                    protocol_version: 1,
                    namespace: "e2e".into(),
                    failover: failover.into(),
                    pod_name: pod.into(),
                    token: token.trim().into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
        let refused = valkey_proto::v1::agent_hub_client::AgentHubClient::new(channel)
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .err()
            .unwrap_or_else(|| panic!("{failover}/{pod} was admitted"));
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    }
    let status = instance.try_status().await.unwrap();
    assert!(status.nodes.iter().all(|n| !n.pod.contains("fake")));
}

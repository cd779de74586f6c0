//! `control-plane DIR`: runs the cluster tests' control plane (etcd and kube-apiserver, with the
//! install applied) for a whole test run, until SIGTERM or SIGINT. Once it serves, DIR (a
//! link made here) points at its folder, which `VALKEY_TEST_CONTROL_PLANE` hands to the tests;
//! `scripts/test.sh` starts it before the tests and stops it by PID after them.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use valkey_e2e::apiserver::ControlPlane;

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let link = std::env::args()
        .nth(1)
        .expect("usage: control-plane DIR (a path to link to the control plane's folder)");
    let started = std::time::Instant::now();
    // Started on the main thread, which lives as long as the process: the children die with
    // the thread that spawned them (PR_SET_PDEATHSIG).
    let plane = ControlPlane::start();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&plane.dir, &link).expect("link the control plane's folder");
    eprintln!(
        "control plane at {} ready in {:.1} s ({})",
        plane.url,
        started.elapsed().as_secs_f64(),
        plane.dir.display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        });
    let _ = std::fs::remove_file(&link);
    // Dropping the plane stops the API server, then etcd, and removes the folder.
    drop(plane);
}

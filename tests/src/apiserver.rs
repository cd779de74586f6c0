//! A real Kubernetes control plane for the cluster tests: the upstream etcd and kube-apiserver,
//! unmodified, built from Go modules by `tests/apiserver/build.sh` and started on loopback with
//! free ports and a temp dir. The API server serves TLS with a certificate from a CA of ours,
//! authorizes with RBAC, signs service-account tokens (TokenRequest, TokenReview) and runs its
//! default admission plugins (Pod Security among them). An admin client certificate
//! (`system:masters`) is for the harness only; the controller gets a service-account token.
//!
//! One control plane serves a whole test run: `scripts/test.sh` starts it with the
//! `control-plane` binary and names its folder in `VALKEY_TEST_CONTROL_PLANE`. A test run
//! without it (`cargo nextest run` by hand) starts one per test process, stopped with it. Either
//! way the install (`kubectl apply -k deploy/`: CRD, namespace, RBAC) is applied once it serves.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

use crate::{free_port, procs::Proc};

/// The environment variable naming a running control plane's folder.
pub const ENV_DIR: &str = "VALKEY_TEST_CONTROL_PLANE";
/// The admin kubeconfig in a control plane's folder; written last, once the install is in.
pub const KUBECONFIG: &str = "kubeconfig";
/// The install's namespace and the controller's service account (deploy/base/).
pub const CONTROLLER_NAMESPACE: &str = "valkey-system";
pub const CONTROLLER_ACCOUNT: &str = "valkey-controller";

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
}

/// The folder with `kube-apiserver` and `etcd`: `VALKEY_CONTROL_PLANE_BIN`, or what
/// `tests/apiserver/build.sh` builds (or finds in its cache).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VALKEY_CONTROL_PLANE_BIN") {
        return dir.into();
    }
    let output = Command::new("bash")
        .arg(repo().join("tests/apiserver/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run tests/apiserver/build.sh");
    assert!(
        output.status.success(),
        "tests/apiserver/build.sh failed: the control plane could not be built"
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// A running control plane, or one that another process runs.
#[derive(Debug)]
pub struct ControlPlane {
    /// Holds the CA, the admin kubeconfig and the service-account key.
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The processes, when this process started them (etcd last: it outlives the API server).
    procs: Vec<Proc>,
    _tmp: Option<TempDir>,
}

impl ControlPlane {
    /// The test run's control plane (`VALKEY_TEST_CONTROL_PLANE`), or a new one for this process.
    pub fn get() -> Self {
        match std::env::var(ENV_DIR) {
            Ok(dir) if !dir.is_empty() => Self::attach(PathBuf::from(dir)),
            _ => Self::start(),
        }
    }

    fn attach(dir: PathBuf) -> Self {
        let url = std::fs::read_to_string(dir.join("url"))
            .unwrap_or_else(|e| panic!("{}/url: {e} (is the control plane up?)", dir.display()));
        ControlPlane {
            dir,
            url: url.trim().to_owned(),
            procs: Vec::new(),
            _tmp: None,
        }
    }

    /// Starts etcd and kube-apiserver, waits until the API server is ready, and applies the
    /// install (`deploy/`).
    pub fn start() -> Self {
        let bins = bin_dir();
        let tmp = tempfile::Builder::new()
            .prefix("control-plane-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_owned();
        let pki = Pki::write(&dir);

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(bins.join("etcd"));
        etcd.arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            // A test's data need not survive a power cut: no fsync, as envtest runs it.
            .arg("--unsafe-no-fsync=true")
            .arg("--listen-metrics-urls=")
            .arg("--log-level=warn");
        let etcd = Proc::spawn("etcd", &mut etcd, &dir.join("etcd.log"));

        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let mut apiserver = Command::new(bins.join("kube-apiserver"));
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                pki.serving_key.display()
            ))
            .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                pki.sa_pub.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/16")
            // Loopback cannot be the kubernetes Service's endpoint, and nothing here needs it.
            .arg("--endpoint-reconciler-type=none")
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--v=1");
        let apiserver = Proc::spawn("kube-apiserver", &mut apiserver, &dir.join("apiserver.log"));
        std::fs::write(dir.join("url"), &url).expect("write url");

        let mut plane = ControlPlane {
            dir,
            url,
            procs: vec![apiserver, etcd],
            _tmp: Some(tmp),
        };
        let admin = serde_json::json!({
            "client-certificate": pki.admin_cert,
            "client-key": pki.admin_key,
        });
        plane.write_kubeconfig(admin, &plane.dir.join("kubeconfig.tmp"));
        plane.wait_ready();
        plane.install();
        std::fs::rename(plane.dir.join("kubeconfig.tmp"), plane.dir.join(KUBECONFIG))
            .expect("kubeconfig");
        plane
    }

    /// A kubeconfig for this API server (trusting its CA) with `user`'s credentials.
    fn write_kubeconfig(&self, user: serde_json::Value, file: &Path) {
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{ "name": "test", "cluster": {
                "server": self.url,
                "certificate-authority": self.dir.join("ca.crt"),
            }}],
            "users": [{ "name": "user", "user": user }],
            "contexts": [{ "name": "test", "context": { "cluster": "test", "user": "user" }}],
            "current-context": "test",
        });
        std::fs::write(file, serde_json::to_vec_pretty(&kubeconfig).expect("json"))
            .expect("write kubeconfig");
    }

    fn kubeconfig_path(&self) -> PathBuf {
        let done = self.dir.join(KUBECONFIG);
        if done.exists() {
            done
        } else {
            self.dir.join("kubeconfig.tmp")
        }
    }

    /// Blocks until `/readyz` answers ok (the API server has loaded and serves).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|out| out.trim() == "ok");
            if ok {
                return;
            }
            for proc in &mut self.procs {
                if let Some(status) = proc.exited() {
                    panic!("the control plane stopped ({status}):\n{}", proc.log_text());
                }
            }
            assert!(
                Instant::now() < deadline,
                "the API server was not ready within 120 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kubectl apply --server-side -k deploy/`, then waits for the CRD to be Established.
    fn install(&self) {
        let dir = repo().join("deploy");
        self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-k",
            &dir.display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("the install was refused: {e}"));
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/failovers.valkey.buf.red",
        ])
        .unwrap_or_else(|e| panic!("the CRD did not become Established: {e}"));
    }

    /// Runs kubectl as the admin; Ok(stdout) or Err(stderr and stdout).
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_with_input(args, None)
    }

    /// Runs kubectl as the admin with `input` on its standard input.
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig_path())
            .args(args)
            .stdin(if input.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("kubectl cannot run ({e}): .ci/install-k8s-tools.sh"));
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).expect("kubectl stdin");
        }
        let output = child.wait_with_output().expect("kubectl");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{}{stdout}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// A client with the admin's rights: for the harness and the test's own reads and writes.
    pub async fn admin(&self) -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig_path()).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        Client::try_from(config).expect("admin client")
    }

    /// The kubeconfig a controller process uses: the API server and `token`, nothing else.
    pub fn kubeconfig_with_token(&self, token: &str, file: &Path) {
        self.write_kubeconfig(serde_json::json!({ "token": token }), file);
    }
}

/// A token for service account `namespace/account` from the TokenRequest API: for `audience`
/// (the API server's own when None), bound to a pod when `pod` names one (as a projected volume
/// gets it), valid for an hour.
pub async fn request_token(
    admin: &Client,
    namespace: &str,
    account: &str,
    audience: Option<&str>,
    pod: Option<(&str, &str)>,
) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]).unwrap_or_default(),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
        },
        ..TokenRequest::default()
    };
    let issued: TokenRequest = accounts
        .create_subresource("token", account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{account}: {e}"));
    issued.status.expect("a TokenRequest status").token
}

/// A namespace of its own for one test (nothing deletes namespaces without a controller
/// manager, so every test makes a fresh one), with the `default` service account the
/// controller manager would have made, and `labels`.
pub async fn test_namespace(admin: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    use rand::RngExt;
    let name = format!("{prefix}-{:08x}", rand::rng().random::<u32>());
    create_namespace(admin, &name, labels).await;
    name
}

/// Namespace `name` labelled `labels`, with its `default` service account.
pub async fn create_namespace(admin: &Client, name: &str, labels: &[(&str, &str)]) {
    let name = name.to_owned();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), &name)
        .create(&PostParams::default(), &account)
        .await
        .unwrap_or_else(|e| panic!("create {name}/default service account: {e}"));
}

/// Whether the Failover CRD is Established.
pub async fn crd_established(admin: &Client) -> bool {
    Api::<CustomResourceDefinition>::all(admin.clone())
        .get("failovers.valkey.buf.red")
        .await
        .ok()
        .and_then(|crd| crd.status?.conditions)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// The control plane's keys and certificates, as files in its folder.
struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Self {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write PKI file");
            path
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn("test control plane CA", None);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let ca_cert_path = write("ca.crt", &ca_cert.pem());
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |cn: &str, org: Option<&str>, server: bool| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::default();
            params.distinguished_name = dn(cn, org);
            if server {
                params.subject_alt_names = vec![
                    SanType::IpAddress([127, 0, 0, 1].into()),
                    SanType::DnsName("localhost".try_into().expect("name")),
                ];
            }
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (serving_cert, serving_key) = leaf("kube-apiserver", None, true);
        let (admin_cert, admin_key) = leaf("test-admin", Some("system:masters"), false);
        let sa_key = KeyPair::generate().expect("service-account key");
        Pki {
            ca_cert: ca_cert_path,
            serving_cert: write("apiserver.crt", &serving_cert),
            serving_key: write("apiserver.key", &serving_key),
            admin_cert: write("admin.crt", &admin_cert),
            admin_key: write("admin.key", &admin_key),
            sa_key: write("sa.key", &sa_key.serialize_pem()),
            sa_pub: write("sa.pub", &sa_key.public_key_pem()),
        }
    }
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

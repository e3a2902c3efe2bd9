//! A real S3-compatible server for one test: `s3s-fs` on a free loopback port, its own data folder,
//! killed when dropped. The binary comes from `S3S_FS_BIN`, else `PATH`, else `~/.cargo/bin`
//! (`scripts/services.sh` installs it); without it the tests fail, loudly.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audotics_trainer::publish::store::{ModelStore, RetryPolicy};

pub const ACCESS_KEY: &str = "audotics-test";
pub const SECRET_KEY: &str = "audotics-test-secret";
pub const BUCKET: &str = "models";

pub struct S3Server {
    pub port: u16,
    pub data: tempfile::TempDir,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS_BIN") {
        return p.into();
    }
    if let Some(p) = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("s3s-fs")).find(|p| p.exists()))
    {
        return p;
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let p = home.join("bin/s3s-fs");
    assert!(p.exists(), "s3s-fs is required for the S3 tests: run scripts/services.sh (or set S3S_FS_BIN)");
    p
}

impl S3Server {
    pub fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(data.path().join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = Self { port, data, child: None };
        server.restart();
        server
    }

    /// Starts (again) on the same port and data folder.
    pub fn restart(&mut self) {
        let child = Command::new(binary())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not answer on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`: every request then hangs unanswered; `CONT`) to the server.
    #[allow(dead_code)] // the worker suite's
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id().to_string();
        let status = Command::new("kill").args(["-s", signal, &pid]).status().unwrap();
        assert!(status.success(), "kill -s {signal} {pid}");
    }

    #[allow(dead_code)] // the worker suite's
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A store under `s3://models/<prefix>` with fast retries for tests.
    pub fn store(&self, prefix: &str) -> ModelStore {
        self.store_with(prefix, SECRET_KEY, fast_retry())
    }

    pub fn store_with(&self, prefix: &str, secret: &str, retry: RetryPolicy) -> ModelStore {
        let options = [
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_access_key_id", ACCESS_KEY.to_string()),
            ("aws_secret_access_key", secret.to_string()),
        ];
        ModelStore::open_s3_with(&format!("s3://{BUCKET}/{prefix}"), &options, retry).unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy { attempts: 3, min_delay: Duration::from_millis(50), max_delay: Duration::from_millis(200) }
}

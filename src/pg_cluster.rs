//! A throwaway PostgreSQL cluster with logical replication, for the demo and
//! the tests: initdb into a temporary directory, a postmaster on a free port,
//! removed again on drop. As root it runs the server as the `postgres` user,
//! since initdb refuses root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Why a throwaway cluster could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No server binaries in PG_BIN_DIR or the newest `/usr/lib/postgresql/*/bin`.
    #[error("PostgreSQL server binaries not found: install postgresql (Debian: apt-get install postgresql), or set PG_BIN_DIR to the directory holding initdb and postgres")]
    NoBinaries,
    /// Running as root with no `postgres` user to run the server as.
    #[error("running as root, but there is no `postgres` user to run the server as: create one (useradd --system postgres)")]
    NoPostgresUser,
    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed.
        what: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `initdb` exited with an error; carries its stderr.
    #[error("initdb failed: {0}")]
    Initdb(String),
    /// The server did not come up (no connections within 60 s); carries its log.
    #[error("postgres did not accept connections within 60 s; its log:\n{0}")]
    NotReady(String),
    /// Connecting to the cluster or running SQL on it failed.
    #[error("SQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A running throwaway cluster; stopped and its directory removed on drop.
pub struct PgCluster {
    root: PathBuf,
    port: u16,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    postmaster: Option<Child>,
}

const DIR_PREFIX: &str = "hubspot-sidecar-pg-";

impl PgCluster {
    /// Creates and starts a new cluster.
    pub async fn start() -> Result<Self, ClusterError> {
        let mut cluster = PgCluster::empty()?;
        let out = cluster
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(ClusterError::Initdb(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        cluster.port = free_port()?;
        cluster.start_postmaster().await?;
        Ok(cluster)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), started and in
    /// recovery, on a port of its own. For the failover and standby tests.
    pub async fn start_standby(primary: &PgCluster) -> Result<Self, ClusterError> {
        let mut cluster = PgCluster::empty()?;
        let out = cluster
            .command("pg_basebackup")
            .args([
                "-D",
                "data",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
            ])
            // An immediate checkpoint: the default spreads it over minutes.
            .args(["--checkpoint", "fast"])
            .args(["-p", &primary.port.to_string()])
            .output()
            .map_err(io("running pg_basebackup"))?;
        if !out.status.success() {
            return Err(ClusterError::Initdb(format!(
                "pg_basebackup: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.port = free_port()?;
        cluster.start_postmaster().await?;
        Ok(cluster)
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub async fn promote(&self) -> Result<(), ClusterError> {
        let (admin, conn) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        admin.batch_execute("SELECT pg_promote(true, 60)").await?;
        drop(admin);
        let _ = conn.await;
        Ok(())
    }

    /// A directory for a new cluster, owned by the user the server runs as.
    fn empty() -> Result<Self, ClusterError> {
        remove_stale_dirs();
        let bin = find_bin_dir().ok_or(ClusterError::NoBinaries)?;
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user().ok_or(ClusterError::NoPostgresUser)?)
        } else {
            None
        };
        let root = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .map_err(io("chown of the cluster directory"))?;
        }
        Ok(PgCluster {
            root,
            port: 0,
            bin,
            run_as,
            postmaster: None,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.current_dir(&self.root);
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
            c.env("HOME", &self.root);
        }
        c
    }

    async fn start_postmaster(&mut self) -> Result<(), ClusterError> {
        let log = std::fs::File::create(self.root.join("postgres.log"))
            .map_err(io("creating the server log"))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(self.root.join("postgres.log"), Some(uid), Some(gid));
        }
        let mut cmd = self.command("postgres");
        cmd.args(["-D", "data", "-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            .args(["-c", "wal_level=logical", "-c", "max_replication_slots=100"])
            .args(["-c", "max_wal_senders=100", "-c", "max_connections=400"])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "shared_buffers=64MB", "-c", "wal_sender_timeout=60s"])
            .args([
                "-c",
                "log_min_messages=warning",
                "-c",
                "logical_decoding_work_mem=64MB",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("server log"))?)
            .stderr(log);
        // The server must die with us, even on kill -9 of this process:
        // PR_SET_PDEATHSIG is tied to the forking *thread*, so fork from a
        // thread that lives as long as the process.
        let child = spawn_from_immortal_thread(cmd)?;
        self.postmaster = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default();
                return Err(ClusterError::NotReady(log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// TCP port the postmaster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Directory holding the server binaries (`initdb`, `postgres`, `pg_recvlogical`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Creates database `name` holding the MeltingSpot reference schema and the publication.
    pub async fn create_meltingspot_db(&self, name: &str) -> Result<String, ClusterError> {
        let (admin, conn) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        drop(admin);
        let _ = conn.await;
        let url = self.url(name);
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        db.batch_execute(SCHEMA_SQL).await?;
        db.batch_execute(PUBLICATION_SQL).await?;
        drop(db);
        let _ = conn.await;
        Ok(url)
    }

    /// Turns TLS on with this certificate and key (PEM), and from then on
    /// accepts TCP connections only over TLS (`hostssl`; the Unix socket
    /// stays open to the harness). For the TLS tests.
    pub async fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.root.join("data");
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, pem).map_err(io(format!("writing {name}")))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod {name}")))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(io(format!("chown {name}")))?;
            }
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl replication all 127.0.0.1/32 trust\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .map_err(io("writing pg_hba.conf"))?;
        let (admin, conn) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        // One statement per call: ALTER SYSTEM refuses an implicit transaction.
        admin.batch_execute("ALTER SYSTEM SET ssl = on").await?;
        admin.batch_execute("SELECT pg_reload_conf()").await?;
        drop(admin);
        let _ = conn.await;
        // The reload is asynchronous: done once plaintext TCP is refused.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .is_ok()
        {
            if std::time::Instant::now() > deadline {
                return Err(ClusterError::NotReady(
                    "the server still accepts plaintext after enabling TLS".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// kill -9 of the postmaster (crash test), then start it again on the same port.
    pub async fn crash_and_restart(&mut self) -> Result<(), ClusterError> {
        if let Some(mut child) = self.postmaster.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Backends notice the postmaster's death and exit; wait for the port to free.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.root.join("data/postmaster.pid"));
        self.start_postmaster().await
    }

    /// Fast shutdown, then the directory is removed.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            // SIGINT = fast shutdown: disconnect clients, write a checkpoint, exit.
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The MeltingSpot reference schema (`sql/meltingspot_schema.sql`).
pub const SCHEMA_SQL: &str = include_str!("../sql/meltingspot_schema.sql");
/// The DBA's publication script (`sql/publication.sql`).
pub const PUBLICATION_SQL: &str = include_str!("../sql/publication.sql");

fn spawn_from_immortal_thread(mut cmd: Command) -> Result<Child, ClusterError> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("pg-cluster-parent".into())
        .spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        })
        .map_err(io("spawning the cluster's parent thread"))?;
    rx.recv()
        .map_err(|_| ClusterError::NotReady("the cluster's parent thread died".into()))?
        .map_err(io("starting postgres"))
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p)
}

fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn free_port() -> Result<u16, ClusterError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

/// Removes cluster directories whose owning process is gone (after kill -9).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

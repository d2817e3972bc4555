//! A throwaway PostgreSQL 15 cluster owned by one test, for tests that must
//! do what the shared server of `PG_BILLING_TEST_DSN` cannot survive: kill it.
//!
//! The cluster runs as the `postgres` OS user (PostgreSQL refuses root), is
//! created with the same initdb flags as bin/lib.sh `start_cluster`, and is
//! stopped and removed when the [`Cluster`] is dropped, also when the test
//! panics.
//!
//! [`Cluster::crash`] SIGKILLs the postmaster and every one of its children
//! at once; [`Cluster::start`] then restarts it with `pg_ctl`, which runs crash
//! recovery. The test process makes itself a child subreaper so that the
//! postmaster (orphaned by `pg_ctl`) and its killed children are reaped here
//! at once: a zombie still owning the pid in `postmaster.pid` would stop the
//! restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

/// Run a PostgreSQL binary as the postgres OS user (from /tmp, a directory it
/// may read); an error carries its output.
fn as_postgres(bin: &str, args: &[&str]) -> Result<(), String> {
    let program = format!("{PG_BIN}/{bin}");
    let mut cmd = if is_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--", &program]);
        c
    } else {
        Command::new(&program)
    };
    let out = cmd
        .args(args)
        .current_dir("/tmp")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{bin} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Parent pid and state of a process, from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(i32, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(ppid, _)| ppid == parent))
        .collect()
}

/// Wait until `pid` is gone: reaped here if it is (or becomes) our child,
/// else until its /proc entry disappears. False if it is still there after `limit`.
fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on one pid with WNOHANG; no memory is shared.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || (r < 0 && proc_stat(pid).is_none()) {
            return true; // reaped here, or not our child and gone
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(5));
    }
}

/// Reap zombies that were reparented to this process (it is a subreaper).
fn reap_orphans() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    for pid in children_of(me) {
        if proc_stat(pid).is_some_and(|(_, s)| s == 'Z') {
            let mut status = 0;
            // SAFETY: as above; the pid is a zombie child of ours.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}

impl Cluster {
    /// A fresh cluster in `dir` listening on 127.0.0.1:`port` and a socket in
    /// /tmp. Anything an earlier run left in `dir` is stopped and removed.
    pub fn create(dir: impl AsRef<Path>, port: u16) -> Cluster {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes who reaps orphans.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER) failed");
        let cluster = Cluster {
            dir: dir.as_ref().to_path_buf(),
            port,
        };
        cluster.remove();
        fs::create_dir_all(&cluster.dir).expect("create the cluster directory");
        if is_root() {
            let out = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir)
                .output()
                .expect("chown");
            assert!(out.status.success(), "chown the cluster directory: {out:?}");
        }
        let d = cluster.dir_str();
        as_postgres(
            "initdb",
            &[
                "-D",
                &d,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        cluster.append_conf(&format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '/tmp'\n\
             max_connections = 100\nshared_buffers = 128MB\nlog_min_messages = warning\n"
        ));
        cluster.start();
        cluster
    }

    /// A hot standby of `primary` in `dir` on `port`: a base backup taken
    /// over the replication protocol (`pg_basebackup -R`, so it streams from
    /// the primary), started read-only.
    pub fn replica_of(primary: &Cluster, dir: impl AsRef<Path>, port: u16) -> Cluster {
        let replica = Cluster {
            dir: dir.as_ref().to_path_buf(),
            port,
        };
        replica.remove();
        let d = replica.dir_str();
        let source_port = primary.port.to_string();
        as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &source_port,
                "-U",
                "postgres",
                "-D",
                &d,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        replica.append_conf(&format!("\nport = {port}\nhot_standby = on\n"));
        replica.start();
        replica
    }

    /// Add `settings` at the end of its postgresql.conf (later lines win).
    fn append_conf(&self, settings: &str) {
        let path = self.dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).expect("read postgresql.conf");
        text.push_str(settings);
        fs::write(&path, text).expect("write postgresql.conf");
    }

    fn dir_str(&self) -> String {
        self.dir.to_str().expect("utf-8 cluster path").to_string()
    }

    /// Start (or restart after a crash: recovery runs) and wait until it accepts connections.
    pub fn start(&self) {
        let d = self.dir_str();
        let log = format!("{d}/server.log");
        as_postgres(
            "pg_ctl",
            &["-D", &d, "-l", &log, "-w", "-t", "120", "start"],
        )
        .unwrap_or_else(|e| panic!("{e}\n--- server.log ---\n{}", self.log_tail(40)));
    }

    /// The postmaster's pid, from the first line of postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Is `pid` a live (not zombie) postgres process serving this cluster's
    /// directory? Guards every signal against a stale pid file whose pid was
    /// reused by some other process.
    fn is_postmaster(&self, pid: i32) -> bool {
        if proc_stat(pid).is_none_or(|(_, state)| state == 'Z') {
            return false;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let dir = self.dir.as_os_str().as_encoded_bytes();
        args.first().is_some_and(|a| a.ends_with(b"postgres"))
            && args.windows(2).any(|w| w[0] == b"-D" && w[1] == dir)
    }

    /// Kill the server abruptly: the postmaster is stopped first (so it can
    /// neither fork nor notice), then it and all its children get SIGKILL
    /// together, and every one is waited for. Returns how many processes died.
    pub fn crash(&self) -> usize {
        let pm = self
            .postmaster_pid()
            .expect("crash: no postmaster.pid, the server is not running");
        assert!(
            self.is_postmaster(pm),
            "crash: pid {pm} of postmaster.pid is not a running postmaster of {}",
            self.dir.display()
        );
        // SAFETY: plain signals to processes of the cluster we started.
        unsafe { libc::kill(pm, libc::SIGSTOP) };
        let children = children_of(pm);
        for &c in &children {
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
        unsafe { libc::kill(pm, libc::SIGKILL) };
        for pid in std::iter::once(pm).chain(children.iter().copied()) {
            assert!(
                wait_gone(pid, Duration::from_secs(20)),
                "process {pid} of the cluster still exists 20 s after SIGKILL (state {:?})",
                proc_stat(pid)
            );
        }
        reap_orphans();
        children.len() + 1
    }

    /// Stop the server now, without a checkpoint (crash-like, but orderly).
    pub fn stop(&self) {
        let pm = self.postmaster_pid();
        if pm.is_some() {
            let _ = as_postgres(
                "pg_ctl",
                &["-D", &self.dir_str(), "-m", "immediate", "-w", "stop"],
            );
        }
        if let Some(pm) = pm {
            if self.is_postmaster(pm) {
                // pg_ctl failed: make sure nothing is left.
                unsafe { libc::kill(pm, libc::SIGKILL) };
            }
            if !wait_gone(pm, Duration::from_secs(20)) {
                eprintln!("postmaster {pm} of {} did not exit", self.dir.display());
            }
        }
        reap_orphans();
    }

    /// Stop whatever runs in the directory and delete it.
    fn remove(&self) {
        if self.dir.join("postmaster.pid").exists() {
            self.stop();
        }
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir).expect("remove the cluster directory");
        }
    }

    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=5",
            self.port
        )
    }

    pub fn try_connect(&self, db: &str) -> Result<Client, postgres::Error> {
        Client::connect(&self.dsn(db), NoTls)
    }

    pub fn connect(&self, db: &str) -> Client {
        self.try_connect(db)
            .unwrap_or_else(|e| panic!("connect to {db} on port {}: {e}", self.port))
    }

    /// The server log, whole.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the server log that say something about the
    /// server: statement errors a test provokes on purpose (with their
    /// HINT, DETAIL and STATEMENT lines) and connections refused while it
    /// starts are left out.
    pub fn log_tail(&self, lines: usize) -> String {
        const NOISE: &[&str] = &[
            "ERROR:  ",
            "HINT:  ",
            "DETAIL:  ",
            "STATEMENT:  ",
            "CONTEXT:  ",
            "FATAL:  the database system is starting up",
            "FATAL:  the database system is not yet accepting connections",
        ];
        let log = self.log();
        let all: Vec<&str> = log
            .lines()
            .filter(|l| !NOISE.iter().any(|m| l.contains(m)))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}/server.log ---\n{}",
                self.dir.display(),
                self.log_tail(40)
            );
        }
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

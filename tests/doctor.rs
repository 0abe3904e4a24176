//! `hubspot-sidecar doctor` against a real Postgres: the real binary, a good
//! database, and one fresh database per broken setup. Settings that are
//! cluster-wide (wal_level) or states that cannot be produced on demand (a lost
//! slot) are covered by the unit tests over the snapshot in src/doctor/.

mod common;

use std::time::Duration;

use common::*;

struct Report {
    code: i32,
    stdout: String,
}

impl Report {
    /// The line of check `name`, e.g. "PASS  wal_level: logical".
    fn line(&self, name: &str) -> &str {
        let needle = format!("  {name}: ");
        self.stdout
            .lines()
            .find(|l| l.contains(&needle) && !l.starts_with(' '))
            .unwrap_or_else(|| panic!("no check {name:?} in:\n{}", self.stdout))
    }

    fn status(&self, name: &str) -> &str {
        &self.line(name)[..4]
    }

    /// The fix printed under check `name`.
    fn fix(&self, name: &str) -> &str {
        let line = self.line(name);
        let mut lines = self.stdout.lines().skip_while(|l| *l != line);
        lines.next();
        lines
            .next()
            .and_then(|l| l.strip_prefix("      fix: "))
            .unwrap_or_else(|| panic!("no fix under {name:?} in:\n{}", self.stdout))
    }
}

async fn doctor(url: &str, slot: &str, extra: &[&str]) -> Report {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubspot-sidecar"))
        .arg("doctor")
        .args(extra)
        .env("DATABASE_URL", url)
        .env("SIDECAR_SLOT", slot)
        .env_remove("SIDECAR_PUBLICATION")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("doctor answers within 60 s")
        .expect("run hubspot-sidecar doctor");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "doctor ({url}):\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Report {
        code: out.status.code().expect("doctor exited by itself"),
        stdout,
    }
}

/// The checks every good database passes.
const REQUIRED: [&str; 10] = [
    "connection",
    "primary",
    "wal_level",
    "replication slots",
    "wal senders",
    "publication hubspot_sidecar",
    "publication tables",
    "replica identity",
    "select privilege",
    "state schema hubspot_sync",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_database_passes_before_and_while_the_sidecar_runs() {
    let (url, name) = fresh_db().await;

    // Before the first start: no slot yet (a WARN, still exit 0).
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    for check in REQUIRED {
        assert_eq!(r.status(check), "PASS", "{}", r.line(check));
    }
    assert_eq!(r.status("role postgres"), "PASS");
    assert_eq!(r.status(&format!("slot {name}")), "WARN");
    assert!(r
        .fix(&format!("slot {name}"))
        .contains("pg_create_logical_replication_slot"));
    // The test cluster sets no max_slot_wal_keep_size: a WARN with the ALTER SYSTEM fix.
    assert_eq!(r.status("max_slot_wal_keep_size"), "WARN");
    assert!(r
        .fix("max_slot_wal_keep_size")
        .starts_with("ALTER SYSTEM SET max_slot_wal_keep_size"));
    assert_eq!(r.status("wal_sender_timeout"), "PASS");
    assert!(r.stdout.contains("doctor: "), "{}", r.stdout);
    assert!(r.stdout.ends_with(" 0 FAIL\n"), "{}", r.stdout);

    // With the sidecar streaming, the slot checks pass too.
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    for check in REQUIRED {
        assert_eq!(r.status(check), "PASS", "{}", r.line(check));
    }
    assert_eq!(r.status(&format!("slot {name}")), "PASS");
    assert_eq!(r.status("slot wal_status"), "PASS");
    assert_eq!(r.status("slot active"), "PASS");
    assert_eq!(r.status("retained WAL"), "PASS");

    // A retained-WAL threshold below what the slot holds: a WARN, still exit 0.
    let db = sql(&url).await;
    db.batch_execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    sidecar.stop().await;
    wait_for("the slot is released", Duration::from_secs(30), || async {
        !db.query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    let r = doctor(&url, &name, &["--max-retained-wal-mb", "0"]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.status("slot active"), "WARN");
    assert_eq!(r.status("retained WAL"), "WARN");
    assert!(r.fix("slot active").contains("pg_drop_replication_slot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publication_fails_with_create_publication() {
    let (url, name) = fresh_db().await;
    sql(&url)
        .await
        .batch_execute("DROP PUBLICATION hubspot_sidecar")
        .await
        .unwrap();
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r
        .line("publication hubspot_sidecar")
        .starts_with("FAIL  publication hubspot_sidecar: does not exist"));
    assert!(r.fix("publication hubspot_sidecar").starts_with(
        "CREATE PUBLICATION hubspot_sidecar FOR TABLE public.members, public.custom_roles,"
    ));
    assert_eq!(r.status("wal_level"), "PASS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_missing_from_the_publication_fails_with_alter_publication() {
    let (url, name) = fresh_db().await;
    sql(&url)
        .await
        .batch_execute("ALTER PUBLICATION hubspot_sidecar DROP TABLE public.member_tags")
        .await
        .unwrap();
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(r.status("publication hubspot_sidecar"), "PASS");
    assert!(r
        .line("publication tables")
        .starts_with("FAIL  publication tables: not published: public.member_tags"));
    assert_eq!(
        r.fix("publication tables"),
        "ALTER PUBLICATION hubspot_sidecar ADD TABLE public.member_tags;"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_nothing_or_default_on_activity_tables_fails() {
    let (url, name) = fresh_db().await;
    sql(&url)
        .await
        .batch_execute(
            "ALTER TABLE public.group_members REPLICA IDENTITY NOTHING;
             ALTER TABLE public.course_progress REPLICA IDENTITY DEFAULT;",
        )
        .await
        .unwrap();
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r
        .line("replica identity public.group_members")
        .starts_with("FAIL  replica identity public.group_members: NOTHING"));
    assert_eq!(
        r.fix("replica identity public.group_members"),
        "ALTER TABLE public.group_members REPLICA IDENTITY DEFAULT;"
    );
    assert_eq!(r.status("replica identity public.course_progress"), "FAIL");
    assert_eq!(
        r.fix("replica identity public.course_progress"),
        "ALTER TABLE public.course_progress REPLICA IDENTITY FULL;"
    );

    // The fix it printed repairs it: applied as is, the database passes again.
    let db = sql(&url).await;
    db.batch_execute(r.fix("replica identity public.group_members"))
        .await
        .unwrap();
    db.batch_execute(r.fix("replica identity public.course_progress"))
        .await
        .unwrap();
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.status("replica identity"), "PASS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_or_select_fails_with_grants() {
    let (url, name) = fresh_db().await;
    let role = format!("{name}_reader");
    let admin = sql(&url).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT SELECT ON public.members TO {role};"
        ))
        .await
        .unwrap();
    let as_role = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(as_role, url, "the harness URL names the postgres user");

    let r = doctor(&as_role, &name, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    let role_check = format!("role {role}");
    assert!(r
        .line(&role_check)
        .starts_with(&format!("FAIL  {role_check}: lacks REPLICATION")));
    assert_eq!(
        r.fix(&role_check),
        format!("ALTER ROLE {role} WITH REPLICATION;")
    );
    assert_eq!(r.status("select privilege"), "FAIL");
    let grant = r.fix("select privilege");
    assert!(
        grant.starts_with("GRANT SELECT ON public.course_progress, public.courses,"),
        "{grant}"
    );
    assert!(grant.ends_with(&format!(" TO {role};")), "{grant}");
    assert!(!grant.contains("public.members,"), "{grant}");
    assert_eq!(r.status("state schema hubspot_sync"), "FAIL");

    // Applying the printed fixes (as the DBA) leaves only WARNs.
    admin.batch_execute(r.fix(&role_check)).await.unwrap();
    admin.batch_execute(grant).await.unwrap();
    admin
        .batch_execute(r.fix("state schema hubspot_sync"))
        .await
        .unwrap();
    let r = doctor(&as_role, &name, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.status(&role_check), "PASS");
    assert_eq!(r.status("select privilege"), "PASS");
    assert_eq!(r.status("state schema hubspot_sync"), "PASS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_a_fail_with_a_clear_message() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = doctor(
        &format!("postgres://someone:secret@127.0.0.1:{port}/nowhere"),
        "hubspot_sidecar",
        &[],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    let line = r.line("connection");
    assert!(
        line.starts_with(&format!(
            "FAIL  connection: cannot connect to 127.0.0.1:{port}/nowhere as someone:"
        )),
        "{line}"
    );
    assert!(!r.stdout.contains("secret"), "{}", r.stdout);
    assert!(r.fix("connection").contains("pg_hba.conf"));
}

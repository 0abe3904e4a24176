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

/// sql/role.sql, as the DBA runs it.
const ROLE_SQL: &str = include_str!("../sql/role.sql");

/// The check of who may call pg_logical_emit_message.
const EMIT: &str = "pg_logical_emit_message";

/// sql/role.sql for role `role` in database `db` (instead of hubspot_sidecar
/// in meltingspot): roles are shared by the tests' databases.
fn role_sql(role: &str, db: &str) -> String {
    ROLE_SQL
        .replace("hubspot_sidecar", role)
        .replace("ON DATABASE meltingspot", &format!("ON DATABASE {db}"))
}

/// The statement of sql/role.sql that takes pg_logical_emit_message from
/// PUBLIC and grants it to the sidecar's role, here `role`.
fn role_sql_emit_message(role: &str) -> String {
    let block = ROLE_SQL
        .split_inclusive("\n$$;")
        .find(|s| s.contains("REVOKE EXECUTE"))
        .expect("sql/role.sql revokes pg_logical_emit_message");
    let start = block.find("DO $$").expect("a DO block");
    block[start..].replace("hubspot_sidecar", role)
}

/// The checks every good database passes.
const REQUIRED: [&str; 11] = [
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
    EMIT,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_database_passes_before_and_while_the_sidecar_runs() {
    let (url, name) = fresh_db().await;
    // Doctor and the sidecar run as postgres here.
    sql(&url)
        .await
        .batch_execute(&role_sql_emit_message("postgres"))
        .await
        .unwrap();

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
        .batch_execute(&format!(
            "ALTER TABLE public.group_members REPLICA IDENTITY NOTHING;
             ALTER TABLE public.course_progress REPLICA IDENTITY DEFAULT;
             {}",
            role_sql_emit_message("postgres")
        ))
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
    assert_eq!(r.status(EMIT), "FAIL");

    // Applying the printed fixes (as the DBA) leaves only WARNs.
    admin.batch_execute(r.fix(EMIT)).await.unwrap();
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
    assert_eq!(r.status(EMIT), "PASS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_logical_emit_message_for_every_role_fails_until_role_sql_keeps_it_to_the_sidecar() {
    let (url, name) = fresh_db().await;
    let admin = sql(&url).await;
    let as_user =
        |role: &str| url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    // A role with nothing but CONNECT (PUBLIC's by default), as the web app or
    // a BI user has: by default it may write into the WAL the sidecar streams.
    let app = format!("{name}_app");
    admin
        .batch_execute(&format!("CREATE ROLE {app} LOGIN"))
        .await
        .unwrap();
    let app_db = sql(&as_user(&app)).await;
    app_db
        .query_one("SELECT pg_logical_emit_message(true, 'x', 'y')", &[])
        .await
        .expect("PUBLIC may call pg_logical_emit_message by default");

    // As postgres, everything else passes: this check alone FAILs.
    let r = doctor(&url, &name, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.ends_with(" 1 FAIL\n"), "{}", r.stdout);
    assert!(
        r.line(EMIT)
            .starts_with("FAIL  pg_logical_emit_message: EXECUTE is granted to PUBLIC: any role"),
        "{}",
        r.line(EMIT)
    );
    let fix = r.fix(EMIT);
    assert!(
        fix.starts_with("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,"),
        "{fix}"
    );
    assert!(
        fix.ends_with(" FROM PUBLIC; -- as sql/role.sql does"),
        "{fix}"
    );

    // sql/role.sql, run twice (it is idempotent), for a sidecar role of this test.
    let sidecar = format!("{name}_sidecar");
    let setup = role_sql(&sidecar, &name);
    admin
        .batch_execute(&setup)
        .await
        .expect("sql/role.sql runs");
    admin
        .batch_execute(&setup)
        .await
        .expect("sql/role.sql runs again");

    // Doctor as the sidecar's role: every check passes (the slot does not exist yet).
    let r = doctor(&as_user(&sidecar), &name, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    for check in REQUIRED {
        assert_eq!(r.status(check), "PASS", "{}", r.line(check));
    }
    assert_eq!(
        r.line(EMIT),
        format!("PASS  pg_logical_emit_message: only {sidecar} and superusers can EXECUTE it")
    );

    // The CONNECT-only role may no longer; the sidecar's role still may.
    for call in [
        "SELECT pg_logical_emit_message(true, 'x', 'y')",
        "SELECT pg_logical_emit_message(false, 'x', 'y'::bytea)",
    ] {
        let err = app_db.query_one(call, &[]).await.expect_err(call);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{err}"
        );
        let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(message.starts_with("permission denied"), "{message}");
    }
    sql(&as_user(&sidecar))
        .await
        .query_one("SELECT pg_logical_emit_message(true, 'x', 'y')", &[])
        .await
        .expect("the sidecar's role keeps pg_logical_emit_message");

    // Granted back to a group role the app belongs to: both are named, and the
    // printed fix (applied by the DBA) revokes it from the group.
    let writers = format!("{name}_writers");
    let overload: String = admin
        .query_one(
            "SELECT oid::regprocedure::text FROM pg_proc
              WHERE proname = 'pg_logical_emit_message' ORDER BY 1 DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {writers} NOLOGIN;
             GRANT {writers} TO {app};
             GRANT EXECUTE ON FUNCTION {overload} TO {writers};"
        ))
        .await
        .unwrap();
    app_db
        .query_one("SELECT pg_logical_emit_message(true, 'x', 'y')", &[])
        .await
        .expect("through its group, the app may again");
    let r = doctor(&as_user(&sidecar), &name, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.line(EMIT).starts_with(&format!(
            "FAIL  pg_logical_emit_message: roles other than {sidecar} can EXECUTE it: {app}, {writers}: "
        )),
        "{}",
        r.line(EMIT)
    );
    let fix = r.fix(EMIT);
    assert!(
        fix.contains(&format!(
            " FROM PUBLIC, {writers}; GRANT EXECUTE ON FUNCTION "
        )),
        "{fix}"
    );
    admin.batch_execute(fix).await.unwrap();
    let r = doctor(&as_user(&sidecar), &name, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.status(EMIT), "PASS");
    app_db
        .query_one("SELECT pg_logical_emit_message(true, 'x', 'y')", &[])
        .await
        .expect_err("revoked from the group again");
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

//! The checker's teeth: against a server with one clause broken (a
//! test-only `Defect`), that clause's check fails, and against a sound
//! server every check passes.

use super::clauses::{Outcome, CLAUSES};
use super::probe::Target;
use braid_core::auth::Key;
use braid_core::server::{Backend, BackendOp, Defect, ExportConfig, ServerConfig, ServerEngine};
use braid_core::testkit::MemDisk;
use braid_core::wire::Status;
use braid_fabric_tcp::{ClientSecurity, Server, ServerSecurity};
use bytes::Bytes;
use std::sync::{Arc, Mutex};

const SIZE: u64 = 4 << 20;

struct Disks(Vec<Mutex<MemDisk>>);

impl Backend for Disks {
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        self.0[export].lock().unwrap().apply(op)
    }
}

/// A server on a free port with `defect`, and how to reach it.
async fn server(defect: Option<Defect>) -> Target {
    let key = Key::new(*b"conformance-test-key");
    let mut ro = ExportConfig::new("ro", SIZE);
    ro.read_only = true;
    let mut config = ServerConfig::new(
        7,
        [3; 32],
        vec![("k".into(), key.clone())],
        vec![ExportConfig::new("disk0", SIZE), ro],
    );
    config.defect = defect;
    if defect == Some(Defect::ExecuteDuplicates) {
        config.sabotage_no_dedup = true;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let disks = Arc::new(Disks(vec![
        Mutex::new(MemDisk::new(SIZE)),
        Mutex::new(MemDisk::new(SIZE)),
    ]));
    tokio::spawn(Server::run(
        listener,
        ServerSecurity::Plain,
        ServerEngine::new(config).unwrap(),
        disks,
        std::future::pending(),
        |_: Server| {},
    ));
    Target {
        addr,
        security: ClientSecurity::Plain,
        key_id: "k".into(),
        key,
        export: "disk0".into(),
        read_only_export: Some("ro".into()),
    }
}

async fn outcome(target: &Target, clause: &str) -> Outcome {
    let (_, _, check) = CLAUSES
        .iter()
        .find(|(n, _, _)| *n == clause)
        .expect("a clause");
    check(target).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sound_server_passes_every_clause() {
    let t = server(None).await;
    for (clause, _, check) in CLAUSES {
        assert_eq!(check(&t).await, Outcome::Pass, "[{clause}]");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_clause_fails_against_a_server_with_it_broken() {
    let cases = [
        (Defect::KeepBadFrames, "2.1"),
        (Defect::IgnoreMalformed, "2.2"),
        (Defect::CloseOnCorruptPayload, "2.3"),
        (Defect::GenericRejects, "3.1"),
        (Defect::WrongRangeStatus, "3.2"),
        (Defect::NoAlignmentCheck, "3.2"),
        (Defect::IgnoreReadOnly, "3.2"),
        (Defect::ShortReads, "3.3"),
        (Defect::NoExecSeq, "3.3"),
        (Defect::WrongPongToken, "3.4"),
        (Defect::IgnoreGoodbye, "3.5"),
        (Defect::ServeBeforeWelcome, "4.1"),
        (Defect::WrongServerProof, "5.1"),
        (Defect::AcceptAnyProof, "5.2"),
        (Defect::FixedServerNonce, "5.3"),
        (Defect::ExecuteDuplicates, "6.1"),
        (Defect::ReplyOnFirstChannel, "6.2"),
        (Defect::AnswerStale, "6.3"),
        (Defect::NoWindowCheck, "6.4"),
        (Defect::AdoptUnknownSessions, "7.1"),
        (Defect::KeepOlderRuns, "7.2"),
        (Defect::AcceptOlderRuns, "7.3"),
    ];
    let covered: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.1).collect();
    let all: std::collections::BTreeSet<&str> = CLAUSES.iter().map(|c| c.0).collect();
    assert_eq!(covered, all, "every clause has a defect that breaks it");
    // Concurrently: a broken clause often costs a timeout to notice.
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(defect, clause)| {
            tokio::spawn(async move {
                let t = server(Some(defect)).await;
                (defect, clause, outcome(&t, clause).await)
            })
        })
        .collect();
    for run in runs {
        let (defect, clause, got) = run.await.unwrap();
        assert!(
            matches!(got, Outcome::Fail(_)),
            "[{clause}] passed against a server with {defect:?}: {got:?}"
        );
    }
}

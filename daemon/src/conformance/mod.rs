//! `braid conformance ADDR`: drives any braid server through every
//! numbered clause of docs/PROTOCOL.md, in the style of h2spec, and prints
//! a table by clause; exits 1 on any failure.

mod clauses;
mod probe;

use crate::client_args::ClientArgs;
use clap::Args;
use clauses::{Outcome, CLAUSES};
pub(crate) use probe::Target;

#[derive(Args, Debug)]
pub(crate) struct ConformanceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A read-only export of the same server, for the READ_ONLY part of
    /// clause 3.2 (skipped without it).
    #[arg(long)]
    read_only_export: Option<String>,
    /// Only these clauses (e.g. `--clause 2.1 --clause 6.3`).
    #[arg(long = "clause")]
    clauses: Vec<String>,
}

pub(crate) async fn run(args: ConformanceArgs) -> Result<(), String> {
    let target = args.client.target(args.read_only_export)?;
    let security = if matches!(target.security, braid_fabric_tcp::ClientSecurity::Plain) {
        "plain TCP"
    } else {
        "TLS"
    };
    println!(
        "braid conformance: {} ({security}), export {:?}, key {:?}",
        target.addr, target.export, target.key_id
    );
    for c in &args.clauses {
        if !CLAUSES.iter().any(|(n, _, _)| n == c) {
            return Err(format!(
                "no clause {c} (PROTOCOL.md numbers them [2.1] to [7.3])"
            ));
        }
    }
    let results = check(&target, &args.clauses, |clause, what, outcome| {
        let (verdict, detail) = match outcome {
            Outcome::Pass => ("PASS", String::new()),
            Outcome::Fail(why) => ("FAIL", format!("\n         {why}")),
            Outcome::Skip(why) => ("SKIP", format!("  ({why})")),
        };
        println!("  [{clause}] {verdict}  {what}{detail}");
    })
    .await;
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|(_, o)| f(o)).count();
    let failed = count(|o| matches!(o, Outcome::Fail(_)));
    println!(
        "{} clauses: {} pass, {failed} fail, {} skipped",
        results.len(),
        count(|o| *o == Outcome::Pass),
        count(|o| matches!(o, Outcome::Skip(_)))
    );
    if failed > 0 {
        return Err(format!("{failed} clause(s) failed"));
    }
    Ok(())
}

/// Runs the clauses named in `only` (every one if empty), reporting each
/// as it finishes.
async fn check(
    target: &Target,
    only: &[String],
    mut report: impl FnMut(&str, &str, &Outcome),
) -> Vec<(&'static str, Outcome)> {
    let mut results = Vec::new();
    for (clause, what, check) in CLAUSES {
        if !only.is_empty() && !only.iter().any(|c| c == clause) {
            continue;
        }
        let outcome = check(target).await;
        report(clause, what, &outcome);
        results.push((*clause, outcome));
    }
    results
}

#[cfg(test)]
mod tests;

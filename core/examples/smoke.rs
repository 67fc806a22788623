use braid_core::testkit::{FaultRates, World, WorldConfig};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(10);
    let faults = args.get(2).map(|s| s.as_str()).unwrap_or("all");
    let mut bad = 0;
    for seed in 0..n {
        let mut cfg = WorldConfig::new(seed);
        if faults == "none" {
            cfg.faults = FaultRates::none();
        }
        let t = std::time::Instant::now();
        let r = World::new(cfg).run();
        if !r.violations.is_empty() {
            bad += 1;
            println!(
                "seed {seed}: {} violations, first: {}",
                r.violations.len(),
                r.violations[0]
            );
        }
        if seed < 3 {
            println!(
                "seed {seed} ios {} vt {:?} wall {:?} faults {:?}\n client {:?}\n server {:?}",
                r.ios,
                r.virtual_time,
                t.elapsed(),
                r.faults,
                r.client,
                r.server
            );
        }
    }
    println!("{bad}/{n} bad");
}

//! The sharded scoring job on a real Slurm: `scripts/slurm_test.sh` starts a single-node
//! cluster on this machine (slurmctld, slurmd and munge, with a configuration of its own),
//! submits `examples/deploy/score-array.sbatch` as a 4-task job array, requeues one task while
//! it runs (it resumes from its output), merges the shards and checks the result against a
//! single-process run: every record exactly once, in input order, with the same numbers.
//!
//! Needs root and Debian's slurm-wlm and munge (`scripts/setup.sh` installs them when run as
//! root); without them the test fails and says so, unless `FERROGEN_SKIP_SLURM=1` skips it.

mod common;

use std::process::Command;

/// Why Slurm cannot run here, if it cannot.
fn missing() -> Option<String> {
    let have = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("slurmctld") || !have("munged") {
        return Some("slurm-wlm and munge are not installed".into());
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    (String::from_utf8_lossy(&uid.stdout).trim() != "0")
        .then(|| "the daemons need root".to_string())
}

#[test]
fn a_slurm_job_array_with_a_requeued_task_merges_into_the_single_process_output() {
    if let Some(why) = missing() {
        if std::env::var("FERROGEN_SKIP_SLURM").as_deref() == Ok("1") {
            eprintln!("SKIPPED in slurm: {why} (FERROGEN_SKIP_SLURM=1)");
            return;
        }
        panic!(
            "{why}: run `bash scripts/setup.sh` as root (it installs slurm-wlm and munge), or \
             set FERROGEN_SKIP_SLURM=1 to skip this test"
        );
    }
    let out = Command::new("bash")
        .arg("scripts/slurm_test.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("FERROGEN", env!("CARGO_BIN_EXE_ferrogen"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the Slurm run failed");
    assert!(stdout.contains("requeued task 2 after"), "{stdout}");
    assert!(stdout.contains("task 2 resumed: resume:"), "{stdout}");
    assert!(stdout.contains("every record once"), "{stdout}");
    assert!(stdout.contains("slurm_test: passed"), "{stdout}");
}

#!/bin/bash
# The sharded scoring job on a real Slurm: a single-node cluster on this machine (slurmctld and
# slurmd on localhost, munge for authentication), a 4-task job array running
# examples/deploy/score-array.sbatch, one task requeued while it runs (Slurm kills it and runs
# it again; --resume makes it go on from its output), then `merge`, checked against a
# single-process run: every record exactly once, the same numbers.
#
#   bash scripts/slurm_test.sh [MODEL] [RECORDS]
#
# Needs root (it installs Debian's slurm-wlm and munge when missing and starts the daemons with
# a configuration of its own under a temporary directory; /etc/slurm is not touched) and
# ferrogen built (cargo build --release; FERROGEN names another binary). MODEL defaults to a
# committed fixture model; RECORDS (default 4000) sizes the dataset so that a task runs for some seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODEL=${1:-$REPO/tests/fixtures/opt-pre-ln-proj}
RECORDS=${2:-4000}
FERROGEN=${FERROGEN:-$REPO/target/release/ferrogen}
[ -x "$FERROGEN" ] || { echo "slurm_test: build ferrogen first (cargo build --release)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm_test: installing slurm-wlm and munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >/dev/null
fi

WORK=$(mktemp -d /tmp/ferrogen-slurm-XXXXXX)
NODE=$(hostname -s)
CPUS=$(nproc)
export SLURM_CONF=$WORK/slurm.conf
cleanup() {
    [ -f "$WORK/slurmctld.pid" ] && kill "$(cat "$WORK/slurmctld.pid")" 2>/dev/null || true
    [ -f "$WORK/slurmd.pid" ] && kill "$(cat "$WORK/slurmd.pid")" 2>/dev/null || true
}
trap cleanup EXIT

# munge: a key, and the daemon (as the munge user)
if ! munge -n >/dev/null 2>&1; then
    mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
    [ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null

mkdir -p "$WORK/state" "$WORK/spool" "$WORK/job/logs"
cat > "$SLURM_CONF" <<EOF
ClusterName=ferrogen-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D >"$WORK/slurmctld.out" 2>&1 &
slurmd -D >"$WORK/slurmd.out" 2>&1 &
for _ in $(seq 30); do
    sinfo -h -o %T 2>/dev/null | grep -q idle && break
    sleep 1
done
sinfo -h -o "%P %T %N" | grep -q idle || { echo "slurm_test: the node did not come up" >&2; cat "$WORK"/*.out >&2; exit 1; }
echo "slurm_test: cluster up ($(sinfo -h -o '%P %T %N %c'))"

# the dataset: token records of 8-40 tokens
python3 - "$WORK/job/data.jsonl" "$RECORDS" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        n = 8 + i * 7 % 33
        f.write(json.dumps({"id": f"r{i}", "tokens": [(i * 31 + j * 17) % 300 + 4 for j in range(n)]}) + "\n")
EOF
"$FERROGEN" score --model "$MODEL" --input "$WORK/job/data.jsonl" --output "$WORK/single.jsonl" \
    --device cpu --batch-tokens 64 2>/dev/null
echo "slurm_test: single-process run: $(wc -l <"$WORK/single.jsonl") answers"

# the array: the deploy script as users run it, sized for this machine (4 tasks, 1 CPU each)
cd "$WORK/job"
JOB=$(MODEL=$MODEL DATA=$WORK/job/data.jsonl FERROGEN=$FERROGEN CPU_MEM=400MiB \
    SCORE_FLAGS="--batch-tokens 64" \
    sbatch --parsable --array=0-3 --cpus-per-task=1 --mem=500M \
    "$REPO/examples/deploy/score-array.sbatch")
echo "slurm_test: submitted array job $JOB"

# requeue task 2 while it runs, once it has written some answers
for _ in $(seq 600); do
    state=$(squeue -h -j "${JOB}_2" -o %T 2>/dev/null || true)
    lines=0
    [ -f scores.shard-2.jsonl ] && lines=$(wc -l <scores.shard-2.jsonl)
    [ "$state" = RUNNING ] && [ "$lines" -gt 0 ] && break
    sleep 0.2
done
before=$(wc -l <scores.shard-2.jsonl)
scontrol requeue "${JOB}_2"
echo "slurm_test: requeued task 2 after $before of its answers"

# wait for the array to finish
for _ in $(seq 1200); do
    [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ] && break
    sleep 0.5
done
[ -z "$(squeue -h -j "$JOB")" ] || { echo "slurm_test: the array did not finish" >&2; exit 1; }
grep -q "resume:" logs/score-"${JOB}"_2.log && echo "slurm_test: task 2 resumed: $(grep 'resume:' logs/score-"${JOB}"_2.log | tail -1)"

"$FERROGEN" merge --input data.jsonl --output merged.jsonl scores.shard-{0..3}.jsonl
python3 - "$WORK/single.jsonl" merged.jsonl <<'EOF'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b), (len(a), len(b))
worst = 0.0
for x, y in zip(a, b):
    assert x["id"] == y["id"], (x["id"], y["id"])
    assert x["scored_tokens"] == y["scored_tokens"]
    worst = max(worst, abs(x["logprob"] - y["logprob"]) / max(1.0, abs(x["logprob"])))
assert worst < 1e-4, worst
print(f"slurm_test: merged {len(b)} answers, every record once, in input order; worst relative logprob difference {worst:.1e}")
EOF
echo "slurm_test: passed"

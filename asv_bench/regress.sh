#!/usr/bin/env bash
# The performance regression gate: benchmark two commits with asv, fail if the second got slower.
#
#   asv_bench/regress.sh [--factor F] [--continuous] BASE [HEAD] [-- ASV_ARGS...]
#
# BASE and HEAD are commits (HEAD: the checkout's HEAD by default; uncommitted changes are not
# measured).  ASV_ARGS go to `asv run` (or `asv continuous`), e.g. `-- -b track_` for the floor
# ratios only.  Both commits run the benchmark suite of this checkout, as `asv continuous` does.
#
# Exit status, as `asv continuous` has it: 0 when no benchmark got slower by more than F
# (default 1.15, and asv's statistics must agree the change is real); 1 when one did; 2 when a
# benchmark failed on HEAD or asv itself failed.  A benchmark that fails on BASE only is
# reported, not held against HEAD.
#
# Default mode, offline, in the current Python environment ($PYTHON, else python3) with its
# NumPy, Numba and peers: each commit is checked out into a git worktree, which goes first on
# the benchmarks' path (fastlsm is pure Python: the checkout is the installed package, and
# nothing is installed into the environment), and is benchmarked by `asv run -E existing
# --set-commit-hash`; then `asv compare` tables the two.  asv compare always exits 0, so this
# script reads its table.  --continuous runs `asv continuous` instead, which builds a virtualenv
# per commit and pip-installs the project into it (it needs the package index).
#
# Results and the HTML report go to asv_bench/.asv/gate/ (emptied at the start): view the report
# with `asv preview --html-dir asv_bench/.asv/gate/html`.
set -euo pipefail

usage() { sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

package=fastlsm     # what the benchmarks import: another project sets its own here
factor=1.15
continuous=false
refs=()
while (($#)); do
    case "$1" in
        --factor) factor=${2:?--factor needs a value}; shift 2 ;;
        --factor=*) factor=${1#--factor=}; shift ;;
        --continuous) continuous=true; shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        -*) echo "regress.sh: unknown option $1" >&2; usage ;;
        *) refs+=("$1"); shift ;;
    esac
done
asv_args=("$@")
((${#refs[@]} >= 1 && ${#refs[@]} <= 2)) || usage

here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
python=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
base=$(git rev-parse --verify "${refs[0]}^{commit}")
head=$(git rev-parse --verify "${refs[1]:-HEAD}^{commit}")
gate="$here/.asv/gate"
rm -rf "$gate"
mkdir -p "$gate"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"; git worktree prune' EXIT

# The suite's configuration with the results and report in $gate.
conf=$("$python" "$here/scratch_conf.py" "$gate" "$head")
asv() { "$python" -m asv "$@" --config "$conf"; }

# asv records results per machine; a non-interactive run needs this machine described first.
# An existing description (perhaps edited by hand) is left as it is.
if ! "$python" -c 'import sys
from asv.machine import Machine, MachineCollection
try:
    MachineCollection.load(Machine.get_unique_machine_name())
except Exception:
    sys.exit(1)' 2>/dev/null; then
    asv machine --yes >/dev/null
fi

publish() { asv publish >/dev/null 2>&1 || echo "regress.sh: asv publish failed" >&2; }

if $continuous; then
    status=0
    asv continuous --factor "$factor" "${asv_args[@]}" "$base" "$head" || status=$?
    publish
    exit "$status"
fi

# Benchmark one commit ($2) as $1 ("base" or "head"); the exit status is asv run's (2: some
# benchmark failed).
run_commit() {
    local name=$1 sha=$2
    echo "== $name: $(git log -1 --format='%h %s' "$sha")"
    local src="$scratch/$name"
    git worktree add --detach --quiet "$src" "$sha"
    # An installed copy must not shadow the checkout, or both runs would measure it.
    local found
    found=$(cd / && PYTHONPATH="$src" "$python" -c "import $package; print($package.__file__)")
    if [[ $found != "$src/"* ]]; then
        echo "regress.sh: $python imports $package from $found, not from $src" >&2
        return 1
    fi
    # asv drops PYTHONPATH from the benchmarks' environment and sets ASV_PYTHONPATH in its place.
    ASV_PYTHONPATH="$src${ASV_PYTHONPATH:+:$ASV_PYTHONPATH}" \
        asv run -E "existing:$python" --set-commit-hash "$sha" --show-stderr "${asv_args[@]}"
}

base_status=0
run_commit base "$base" || base_status=$?
head_status=0
run_commit head "$head" || head_status=$?
for status in "$base_status" "$head_status"; do
    if ((status != 0 && status != 2)); then
        echo "regress.sh: asv run failed (exit status $status)" >&2
        exit 2
    fi
done

table=$(asv compare --factor "$factor" --only-changed --sort ratio "$base" "$head")
publish
echo
echo "== Benchmarks that changed by more than a factor $factor (+ slower, - faster, ! failed):"
echo "${table:-(none)}"
echo
# Rows of the github-style table start with the change mark: "| + |", "| - |" or "| ! |".
slower=$(grep -c '^| *+ ' <<<"$table" || true)
failed=$(grep -c '^| *! ' <<<"$table" || true)
if ((base_status == 2)); then
    echo "regress.sh: some benchmarks failed on BASE ${base:0:8} (not held against HEAD)"
fi
if ((head_status == 2 || failed > 0)); then
    echo "regress.sh: FAILED: benchmarks failed to run on HEAD ${head:0:8} (see asv's output above)"
    exit 2
fi
if ((slower > 0)); then
    echo "regress.sh: FAILED: $slower benchmark(s) slower than a factor $factor on HEAD ${head:0:8}"
    exit 1
fi
echo "regress.sh: passed: nothing slower than a factor $factor on HEAD ${head:0:8}"

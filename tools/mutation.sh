#!/usr/bin/env bash
# Mutation testing of the modules where a wrong number goes unnoticed (docs/testing.md).
#
#   tools/mutation.sh                 every module of [tool.mutmut.modules] in pyproject.toml
#   tools/mutation.sh stats           that module
#   tools/mutation.sh stats 'kdtoolkit.report.stats.x_qwk_of*'   some mutants of one module
#
# Each module runs in .mutation/MODULE (a copy of kdtoolkit/ and tests/ with a pyproject.toml
# whose [tool.mutmut] mutates that module alone against its own tests), at the lowest CPU
# priority, KD_MUTATION_JOBS workers (default 1). Its score is appended to .mutation/scores.tsv;
# survivors listed in tools/mutation_equivalent.txt are counted as equivalent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
jobs="${KD_MUTATION_JOBS:-1}"

modules_of() {
    python - "$@" <<'PY'
import sys, tomllib
mods = tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["modules"]
want = sys.argv[1:] or list(mods)
bad = [m for m in want if m not in mods]
if bad:
    sys.exit(f"tools/mutation.sh: unknown module {bad[0]!r}; choose from {', '.join(mods)}")
print(" ".join(want))
PY
}

write_config() {  # $1 module -> .mutation/$1/pyproject.toml
    python - "$1" <<'PY'
import json, sys, tomllib
name = sys.argv[1]
tool = tomllib.load(open("pyproject.toml", "rb"))["tool"]
mm, mod = tool["mutmut"], tool["mutmut"]["modules"][name]
cfg = {k: v for k, v in mm.items() if k != "modules"}
cfg["only_mutate"] = [mod["mutate"]]
cfg["pytest_add_cli_args_test_selection"] = mod["tests"]
lines = ["[tool.pytest.ini_options]", 'addopts = "-ra"',
         f"markers = {json.dumps(tool['pytest']['ini_options'].get('markers', []))}", "",
         "[tool.mutmut]"]
lines += [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
open(f".mutation/{name}/pyproject.toml", "w").write("\n".join(lines) + "\n")
PY
}

score() {  # $1 module, $2 seconds -> one line, appended to .mutation/scores.tsv
    python - "$1" "$2" <<'PY'
import json, re, subprocess, sys, tomllib
name, secs = sys.argv[1], int(sys.argv[2])
mod = tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["modules"][name]
dotted = mod["mutate"][:-3].replace("/", ".")
equiv = set()
for line in open("tools/mutation_equivalent.txt"):
    if line.strip() and not line.startswith("#"):
        equiv.add(line.split()[0])
out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=f".mutation/{name}",
                     capture_output=True, text=True).stdout
status = {}
for line in out.splitlines():
    m = re.match(r"\s*(\S+__mutmut_\d+): (.+)", line)
    if m and m.group(1).startswith(dotted + "."):
        status[m.group(1)] = m.group(2).strip()
killed = sum(s == "killed" for s in status.values())
timeout = sum(s == "timeout" for s in status.values())
survived = sorted(k for k, s in status.items() if s in ("survived", "no tests"))
eq = [k for k in survived if k in equiv]
left = [k for k in survived if k not in equiv]
other = {k: s for k, s in status.items() if s not in ("killed", "timeout", "survived", "no tests")}
den = len(status) - len(eq) - len(other)
pct = 100.0 * (killed + timeout) / den if den else 100.0
row = (f"{name}\t{len(status)}\t{killed}\t{timeout}\t{len(left)}\t{len(eq)}\t{len(other)}"
       f"\t{pct:.1f}\t{secs}")
with open(".mutation/scores.tsv", "a") as f:
    f.write(row + "\n")
print(f"{name}: {len(status)} mutants, {killed} killed, {timeout} timed out, {len(left)} survived,"
      f" {len(eq)} equivalent, {len(other)} other; score {pct:.1f}% in {secs} s")
for k in left:
    print(f"  survived: {k}   (mutmut show {k}, in .mutation/{name})")
for k, s in other.items():
    print(f"  {s}: {k}")
PY
}

if [ "$#" -gt 0 ]; then
    read -r -a names <<< "$(modules_of "$1")"
    shift
else
    read -r -a names <<< "$(modules_of)"
fi
select=("$@")
mkdir -p .mutation
[ -f .mutation/scores.tsv ] || printf 'module\tmutants\tkilled\ttimeout\tsurvived\tequivalent\tother\tscore%%\tseconds\n' > .mutation/scores.tsv
for name in "${names[@]}"; do
    dir=".mutation/$name"
    mkdir -p "$dir"
    rm -rf "$dir/kdtoolkit" "$dir/tests"
    cp -a kdtoolkit tests conftest.py "$dir/"
    write_config "$name"
    mutate="$(python -c "import sys,tomllib;print(tomllib.load(open('pyproject.toml','rb'))['tool']['mutmut']['modules'][sys.argv[1]]['mutate'])" "$name")"
    dotted="${mutate%.py}"; dotted="${dotted//\//.}"
    [ "${#select[@]}" -gt 0 ] || select=("$dotted.*")
    echo "== $name: $mutate (${jobs} worker(s), nice 19)"
    start=$(date +%s)
    (cd "$dir" && env -u PYTHONPATH OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        nice -n 19 mutmut run --max-children "$jobs" "${select[@]}" > run.log 2>&1) \
        || { echo "mutmut failed; see $dir/run.log"; tail -20 "$dir/run.log"; exit 1; }
    score "$name" "$(( $(date +%s) - start ))"
    select=()
done

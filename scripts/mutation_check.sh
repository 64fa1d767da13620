#!/usr/bin/env bash
# Mutation testing of the core modules with cosmic-ray: every mutant of MODULE (an operator swapped, a constant or
# comparison changed, a condition negated, a break/continue swapped, ...) is applied to a copy of the tree and
# MODULE's fast tests run against it; a mutant the tests pass on "survived" and shows a property nothing checks.
#
#   pip install -c constraints.txt cosmic-ray
#   bash scripts/mutation_check.sh tokenizer/quantizer.py eval/geneval_scoring.py    # some modules
#   bash scripts/mutation_check.sh all                                               # every core module
#   bash scripts/mutation_check.sh --list                                            # the modules and their tests
#
# Results are kept in runs/mutation/<module>-<hash>.sqlite, the hash taken over the module: a rerun continues where
# the last one stopped, a changed module starts a fresh session, and changed tests rerun the surviving mutants. Each module ends
# with "MODULE: K killed, S survived of N (P% killed)" and the survivors (cosmic-ray's report: operator, line) in
# runs/mutation/<module>.survivors.txt. Not in CI (too slow); run it before committing a change to a core module.
#
# Operators left out (the same for every module): the binary-operator swaps to bitwise, shift, modulo,
# floor-division and power operators, and the unary inversions, which on this code's float and tensor arithmetic
# raise at once; every other cosmic-ray core operator runs, except inside type annotations (never evaluated here).
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A TESTS=(
    [tokenizer/quantizer.py]="tests/test_tokenizer.py::quantizer or search or codes or vq_loss or usage or straight or decode"
    [tokenizer/losses.py]="tests/test_losses.py tests/test_objective.py"
    [tokenizer/objective.py]="tests/test_objective.py"
    [tokenizer/encoder.py]="tests/test_tokenizer.py tests/test_encoder_loading.py tests/test_timm_encoder.py"
    [tokenizer/model.py]="tests/test_tokenizer.py"
    [llm/sampler.py]="tests/test_sampler.py::not zero2_engine"
    [llm/vocab.py]="tests/test_vocab.py tests/test_sentencepiece.py::not understanding_trainer"
    [data/sequences.py]="tests/test_ar_gen.py tests/test_vocab.py::not two_process and not resumed_or_rebatched and not pretrained_lm_directory"
    [data/mix.py]="tests/test_unified.py::task_mix"
    [eval/geneval_scoring.py]="tests/test_geneval_scoring.py"
    [eval/dpg_scoring.py]="tests/test_dpg_bench.py"
    [eval/understanding_scoring.py]="tests/test_understanding_scoring.py"
    [eval/metrics.py]="tests/test_metrics.py"
    [train/ema.py]="tests/test_train_parts.py::ema"
    [train/guard.py]="tests/test_train_parts.py::nonfinite"
    [train/checkpoint.py]="tests/test_train_parts.py::rng or checkpoint"
    [data/transforms.py]="tests/test_transforms.py"
    [train/data_order.py]="tests/test_train_parts.py tests/test_shards.py::sampler or loader or shard_order or resume_at_any or workers_split or killed_reader"
)
EXCLUDED='core/ReplaceBinaryOperator_.*_(BitOr|BitAnd|BitXor|LShift|RShift|Mod|FloorDiv|Pow)$|core/ReplaceUnaryOperator_.*Invert'
OUT=runs/mutation

if [ "${1:-}" = "--list" ] || [ $# -eq 0 ]; then
    for module in $(printf '%s\n' "${!TESTS[@]}" | sort); do printf '%-32s %s\n' "$module" "${TESTS[$module]}"; done
    [ $# -eq 0 ] && echo "usage: bash scripts/mutation_check.sh MODULE... | all | --list" >&2 && exit 2
    exit 0
fi
command -v cosmic-ray > /dev/null || { echo "error: cosmic-ray is not installed (pip install -c constraints.txt cosmic-ray)" >&2; exit 2; }
modules=("$@")
[ "$1" = "all" ] && mapfile -t modules < <(printf '%s\n' "${!TESTS[@]}" | sort)
for module in "${modules[@]}"; do
    [ -n "${TESTS[$module]+x}" ] || { echo "error: $module is not a core module with mapped tests (see --list)" >&2; exit 2; }
done

python=$(command -v python)  # the active environment's (a venv's python is a link: never resolve it)
"$python" -c "import pytest, torch" 2> /dev/null || { echo "error: $python lacks pytest or torch: activate the project's environment" >&2; exit 2; }
mkdir -p "$OUT"
tree=$(realpath "$OUT")/tree-$$  # this run's own copy: runs on different modules may go side by side
trap 'rm -rf "$tree"' EXIT
rm -rf "$tree" && mkdir -p "$tree"  # the working tree as it is now (tracked and untracked files); mutants go there
git ls-files -co --exclude-standard -z | xargs -0 tar -cf - | tar -xf - -C "$tree"

for module in "${modules[@]}"; do
    spec=${TESTS[$module]}  # "test files[::pytest -k expression]"
    paths=${spec%%::*}
    selection=""
    [[ $spec == *::* ]] && selection=" -k '${spec#*::}'"
    read -r -a files <<< "$module $paths"
    hash=$(sha1sum < "$tree/$module" | cut -c1-12)  # the copy the mutants are applied to
    tests_hash=$(cd "$tree" && cat "${files[@]:1}" | sha1sum | cut -c1-12)
    name=${module//\//.}
    session=$(realpath "$OUT")/$name-$hash.sqlite
    config=$(realpath "$OUT")/$name.toml
    # the unmutated tree must pass, or every mutant would count as killed; its time sets the mutants' time limit (a
    # mutant that loops forever is stopped after 10x the unmutated run, at least a minute, and counts as killed)
    tests="$python -m pytest -x -q -p no:cacheprovider -m 'not slow' $paths$selection"  # what every mutant runs
    start=$(date +%s)
    (cd "$tree" && eval "DS_ACCELERATOR=cpu $tests" > /dev/null) ||
        { echo "error: the tests of $module fail on the unmutated tree" >&2; exit 2; }
    limit=$(( ($(date +%s) - start) * 10 ))
    [ "$limit" -lt 60 ] && limit=60
    cat > "$config" << EOF
[cosmic-ray]
module-path = "$module"
timeout = $limit.0
excluded-modules = []
test-command = "$tests"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = ['$EXCLUDED']
EOF
    echo "== $module: $paths$selection (time limit per mutant ${limit}s)"
    (
        cd "$tree"
        if [ ! -f "$session" ]; then
            cosmic-ray init "$config" "$session"
            cr-filter-operators "$session" "$config"
            "$python" - "$session" "$module" << 'PY'
# Mutants inside type annotations are skipped: under `from __future__ import annotations` none is evaluated, so
# each would be an equivalent mutant (e.g. `str | Path` -> `str - Path`).
import ast, sqlite3, sys
session, module = sys.argv[1:]
spans = []
for node in ast.walk(ast.parse(open(module).read())):
    notes = [getattr(node, "annotation", None), getattr(node, "returns", None)]
    spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in notes if isinstance(a, ast.AST)]
db = sqlite3.connect(session)
done = {row[0] for row in db.execute("select job_id from work_results")}
for job, row, col in db.execute("select job_id, start_pos_row, start_pos_col from mutation_specs").fetchall():
    if job not in done and any(lo <= (row, col) < hi for lo, hi in spans):
        db.execute("insert into work_results (job_id, worker_outcome, output) values (?, 'SKIPPED', ?)",
                   (job, "type annotation"))
db.commit()
PY
        elif [ "$(cat "$session.tests" 2> /dev/null)" != "$tests_hash" ]; then  # new tests: rerun the survivors
            "$python" -c "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute(\"delete from work_results where upper(test_outcome) = 'SURVIVED'\"); db.commit()" "$session"
        fi
        echo "$tests_hash" > "$session.tests"
        DS_ACCELERATOR=cpu cosmic-ray exec "$config" "$session"
    )
    cr-report "$session" --show-pending > "$OUT/$name.report.txt"
    python - "$session" "$module" "$OUT/$name.survivors.txt" << 'EOF'
import sqlite3, sys
session, module, survivors = sys.argv[1:]
db = sqlite3.connect(session)
rows = db.execute("select r.test_outcome, r.worker_outcome, m.operator_name, m.start_pos_row from work_results r "
                  "join mutation_specs m on m.job_id = r.job_id").fetchall()
ran = [r for r in rows if str(r[1]).upper() != "SKIPPED"]
outcome = [(str(r[0]).upper(), r) for r in ran]
killed = sum(o in ("KILLED", "INCOMPETENT") for o, _ in outcome)  # incompetent: the mutant cannot even run
alive = sorted((r[3], r[2]) for o, r in outcome if o == "SURVIVED")
pending = db.execute("select count(*) from mutation_specs").fetchone()[0] - len(rows)
with open(survivors, "w") as f:
    f.writelines(f"{module}:{line} {op}\n" for line, op in alive)
share = 100 * killed / len(ran) if ran else 0.0
print(f"{module}: {killed} killed, {len(alive)} survived of {len(ran)} ({share:.1f}% killed)"
      + (f", {pending} not run yet" if pending else "") + f"; survivors in {survivors}")
EOF
done

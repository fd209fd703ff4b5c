#!/usr/bin/env bash
# What a release ships, checked as a user meets it (`make release-check`, part of `make test`):
#   1. `python -m build` makes the sdist and, from it, the wheel (compiled with mypyc where a C
#      compiler works), printing no setuptools deprecation banner;
#   2. that wheel installs into a fresh venv, and `policy-engine lint policies/` runs from it, away
#      from the source tree; without the `report` extra, `--format html` says which extra it needs;
#   3. a build with no C compiler (CC=/bin/false, POLICY_ENGINE_COMPILE=auto) still makes a wheel,
#      which installs and runs in pure Python.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/policy-engine-release.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

fail() { echo "release-check: $*" >&2; exit 1; }

banner_free() {  # the build log of $1 has no deprecation banner
  if grep -n -i -E "deprecat|\*{20}" "$1"; then fail "the build printed a deprecation banner (above)"; fi
}

run_from_venv() {  # $1: the wheel; $2: what its build must be (compiled | pure)
  local venv="$WORK/venv-$2"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$1"
  # From an empty folder, so nothing resolves to the source tree.
  mkdir -p "$WORK/cwd-$2"
  (cd "$WORK/cwd-$2" && "$venv/bin/policy-engine" --version && "$venv/bin/policy-engine" lint "$ROOT/policies") \
    || fail "policy-engine lint failed from the $2 wheel"
  build=$(cd "$WORK/cwd-$2" && "$venv/bin/python" -c "from policy_engine import _mypyc; print(_mypyc.describe_build())")
  echo "installed $2 wheel: $build"
  case "$2:$build" in
    compiled:*compiled*|pure:*pure*) ;;
    *) fail "the $2 wheel installed a build that says: $build" ;;
  esac
  # No `report` extra in this venv: --format html is a usage error that names the extra.
  set +e
  (cd "$WORK/cwd-$2" && "$venv/bin/policy-engine" simulate "$ROOT/policies/default.yaml" \
     --requests "$ROOT/data/requests.jsonl.gz" --format html >"$WORK/html.out" 2>"$WORK/html.err")
  status=$?
  set -e
  [ "$status" = 2 ] && grep -q "policy-engine\[report\]" "$WORK/html.err" \
    || fail "--format html without plotly: exit $status, $(cat "$WORK/html.err")"
}

echo "== sdist and wheel (python -m build)"
"$PYTHON" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "python -m build failed"; }
banner_free "$WORK/build.log"
ls "$WORK/dist"
sdist=$(ls "$WORK"/dist/*.tar.gz)
listing=$(tar tzf "$sdist")  # not piped into grep -q: pipefail would see tar's SIGPIPE
for f in LICENSE CHANGELOG.md README.md; do
  grep -q "^[^/]*/$f$" <<<"$listing" || fail "the sdist lacks $f"
done
wheel=$(ls "$WORK"/dist/*.whl)
if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; then expect=compiled; else expect=pure; fi
run_from_venv "$wheel" "$expect"

echo "== wheel built without a C compiler (CC=/bin/false)"
CC=/bin/false CXX=/bin/false POLICY_ENGINE_COMPILE=auto "$PYTHON" -m build --wheel --outdir "$WORK/pure" . \
  >"$WORK/pure.log" 2>&1 || { tail -40 "$WORK/pure.log"; fail "the build without a compiler failed"; }
grep -q "building pure Python" "$WORK/pure.log" || fail "the build without a compiler did not say it fell back to pure Python"
pure=$(ls "$WORK"/pure/*.whl)
if unzip -l "$pure" | grep '\.so$'; then fail "the wheel built without a compiler holds compiled modules"; fi
run_from_venv "$pure" pure
echo "release-check: ok"

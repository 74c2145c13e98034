#!/bin/bash
# The transcript at the end of docs/failures.md: each bad input and the last line it printed.
#   bash docs/failures.sh SCRATCH      # a new folder; about two minutes on one core
set -u
P=$(cd "$(dirname "$0")/.." && pwd)
mkdir "$1" && cd "$1" || exit 1
ln -s "$P"/*.py "$P"/study .          # so that the commands read as a user types them
export OMP_NUM_THREADS=1
python train.py --preset smoke --out run > /dev/null
python mbeir.py --sample mb > /dev/null
python train.py --preset smoke --mbeir mb --out mbrun --no_eval > /dev/null
t() { echo "\$ ${SHOWN:-$*}"; timeout 300 "$@" > out.txt 2>&1; rc=$?
      grep -v '^device:\|^threads: 1\|^  File\|^Traceback' out.txt | grep -e "${KEEP:-.}" | tail -n ${N:-1}
      echo "(exit $rc)"; }
t python train.py --preset smoke --steps 0
t python train.py --preset smoke --lr inf
t python train.py --preset smoke --device cuda
t python train.py --preset smoke --gamma 0.2
t python train.py --preset smoke --batch_size 100000
t python train.py --preset smoke --n_hard 1000
t python train.py --preset smoke --stages elva,text
t python train.py --preset smoke --eval_tasks sample_task0
t python train.py --preset smoke --out mb
t python train.py --preset smoke --stages elva --init mbrun/contrastive --out x1
t python train.py --preset smoke --mbeir mb --eval_tasks nope --out x2
t python train.py --preset smoke --mbeir mb --rl_batch 999 --out x3
t python train.py --preset smoke --out run
t python train.py --preset smoke --out run --resume --steps 80
t python train.py --preset smoke --out run --resume --overwrite
echo 1 > run/.lock
t python train.py --preset smoke --out run --resume
echo 999999 > run/.lock
KEEP='taking over' t python train.py --preset smoke --out run --resume --no_eval
rm -rf cp && cp -r run cp && rm cp/contrastive/optimizer-*.pt
t python train.py --preset smoke --out cp --resume
rm -rf cp && cp -r run cp && printf 'xx' >> cp/contrastive/model.safetensors
t python eval.py --ckpt cp/contrastive
SHOWN="OMP_NUM_THREADS=abc python train.py --preset smoke --out x4" OMP_NUM_THREADS=abc \
  N=1 t python train.py --preset smoke --out x4
KEEP=warning t python train.py --preset smoke --threads 8 --out x5 --no_eval
t python explain.py run/nothing
t python explain.py run/contrastive --task t2t
t python eval.py --ckpt run
t python eval.py --ckpt no/such/folder
t python eval.py --ckpt run/contrastive --ckpt run/contrastive
t python eval.py --ckpt run/contrastive --out run/contrastive/eval.json
t python eval.py --ckpt mbrun/contrastive --mbeir mb --run_file mbrun/contrastive/model.safetensors
echo "my notes" > notes.txt
t python eval.py --ckpt run/contrastive --out notes.txt
t python eval.py --ckpt run/contrastive --out /missing/e.json
t python eval.py --from_json run/eval.json run/eval.json
t python mbeir.py --sample mb
rm -rf mbd && cp -r mb mbd && q=mbd/query/test/mbeir_sample_task0_test.jsonl && head -1 $q >> $q
t python eval.py --ckpt mbrun/contrastive --mbeir mbd --tasks sample_task0
echo '{"qry_text": "x", "qry_img_path": null, "tgt_text": ["a"], "tgt_img_path": ["1.jpg", "2.jpg"]}' > m.jsonl
t python eval.py --ckpt mbrun/contrastive --mmeb m.jsonl --mmeb_images mb
SHOWN="python -c \"from retriever import Retriever; from PIL import Image; Retriever.from_pretrained('run/elva').encode_image(Image.new('RGB', (0, 0)))\"" \
  t python -c "from retriever import Retriever; from PIL import Image; Retriever.from_pretrained('run/elva').encode_image(Image.new('RGB', (0, 0)))"
cp -r run run_b && echo "x" > run_b/run.trec
N=2 KEEP='^[0-9]\|ONLY' t python -m study compare run run_b
t python -m study runs run/contrastive x6 --only '^nothing$'

#!/usr/bin/env bash
# The GPU checks in one go (one GPU is enough): tests/gpu, the trainer's real step vs
# transformers on the 1.3b shape at seq 2048 in bf16 and fp16 (MFU), a larger batch for
# the trainer's MFU, and the serving engine vs transformers' generate on the GPU.
#   bash bench/gpu_checks.sh OUTDIR [PART...]   # JSON and logs land in OUTDIR
#   PYTHON=.venv/bin/python bash bench/gpu_checks.sh OUTDIR   # another interpreter (default python3)
# PARTs (default: all): tests_gpu step_bf16 step_fp16 step_bf16_compile step_bf16_b8 step_125m step_125m_compile
#   recipe_125m trace trace_compile serve (*_compile: the trainer's --compile, its first step
#   the compile; recipe_125m: the model's step with fp32 weights under autocast against
#   FSDP2's bf16 mixed precision, the trainer's recipe on one rank as on many)
# (trace: where the 125m step's GPU waits, bench/step_trace.py; gzipped traces in OUTDIR/trace)
# Each part has its own time limit and the script goes on past a failed part; the exit
# status is non-zero if any part failed. Each part's stdout is NAME.out; stderr goes to all.log.
set -u
out=${1:?usage: bench/gpu_checks.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rc=0
shift
parts=" $* "
part() {  # part NAME SECONDS CMD...: stdout to NAME.out, stderr to NAME.log
    local name=$1 secs=$2; shift 2
    [ "$parts" = "  " ] || [[ "$parts" == *" $name "* ]] || return 0
    local t0=$SECONDS
    timeout "$secs" "$@" >"$out/$name.out" 2>"$out/$name.log"
    local r=$?
    echo "== $name: exit $r in $((SECONDS - t0)) s"
    [ $r -eq 0 ] || { rc=1; tail -n 25 "$out/$name.log"; }
    { echo "== $name: exit $r"; cat "$out/$name.log"; } >>"$out/all.log" && rm -f "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
part tests_gpu 180 $py -m pytest tests/gpu -q -p no:cacheprovider -k "not bench" -o addopts="" -rA
part step_bf16 150 $py bench/train_step.py --device cuda --preset 1.3b --seq-len 2048 --batch 2 \
    --repeats 9 --dtype bf16 --sides trainer,hf
part step_fp16 100 $py bench/train_step.py --device cuda --preset 1.3b --seq-len 2048 --batch 2 \
    --repeats 5 --dtype fp16 --sides trainer,hf --no-memory
part step_bf16_compile 150 $py bench/train_step.py --device cuda --preset 1.3b --seq-len 2048 --batch 2 \
    --repeats 9 --dtype bf16 --sides trainer,hf --compile --no-memory
part step_bf16_b8 80 $py bench/train_step.py --device cuda --preset 1.3b --seq-len 2048 --batch 8 \
    --repeats 4 --dtype bf16 --sides trainer --no-memory
part step_125m 70 $py bench/train_step.py --device cuda --preset 125m --seq-len 2048 --batch 8 \
    --repeats 9 --dtype bf16 --sides trainer,hf
part recipe_125m 70 $py bench/train_step.py --device cuda --preset 125m --seq-len 2048 --batch 8 \
    --repeats 9 --dtype bf16 --sides ours,ours_bf16,hf --no-memory
part step_125m_compile 150 $py bench/train_step.py --device cuda --preset 125m --seq-len 2048 --batch 8 \
    --repeats 9 --dtype bf16 --sides trainer,hf --compile
part trace 90 $py bench/step_trace.py "$out/trace" --preset 125m --seq-len 2048 --batch 8
part trace_compile 120 $py bench/step_trace.py "$out/trace_compile" --preset 125m --seq-len 2048 \
    --batch 8 --sides trainer --compile
part serve 60 $py bench/serve.py --device cuda --dtype bfloat16 --quick --rates 4,16
[ -f "$out/tests_gpu.out" ] && tail -n 3 "$out/tests_gpu.out"
exit $rc

#!/usr/bin/env bash
# Every GPU check in one go, for a short lease on a CUDA machine (see README "GPU checks").
# Usage: OUT=/some/dir bash benchmarks/gpu_session.sh [STEP...]   (needs torch with CUDA and transformers; run from
# the repo root). Steps: train generate check pipeline fsdp pretrain (default: all, in that order).
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/.gpu/site:${PYTHONPATH:-}"
PY=${PY:-python3}
STEPS=${*:-train generate check pipeline fsdp pretrain}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.log"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/env.log"
run() { local name=$1 limit=$2; shift 2; case " $STEPS " in *" $name "*) ;; *) return;; esac
  echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - t0))s" | tee -a "$OUT/env.log"
  grep -v "^\s*$" "$OUT/$name.log" | tail -25; }
# 124M (GPT-2 small) training step, eager and torch.compile'd, bf16 and TF32, against transformers' GPT2
run train 210 $PY benchmarks/train_throughput.py --layers 12 --dim 768 --heads 12 --vocab 50304 --seq 1024 \
    --batch 16 --compile --dtypes bfloat16,float32 --iters 6 --warmup 2
# cached generation; compiled decoding replays each step as a CUDA graph (perf hints name any skipped graph)
TORCH_LOGS=perf_hints run generate 150 $PY benchmarks/generate.py --layers 12 --dim 768 --heads 12 --vocab 50304 \
    --ctx 1024 --dtypes bfloat16 --iters 3
# correctness (flash SDPA, causality, cache, left padding) and the memory model against max_memory_allocated
run check 150 $PY benchmarks/cuda_check.py
run pipeline 170 $PY -m nanogpt4 pipeline --device cuda --scale 1 --out /tmp/gpu_pipeline data.max_bytes=20000000 \
    training.max_steps=300 rlhf.sft_steps=60 rlhf.reward_steps=60 rlhf.ppo_steps=8 rlhf.dpo_steps=20 \
    rlhf.label_prompts=200 rlhf.eval_prompts=64 multimodal.align_steps=20 multimodal.tune_steps=300 \
    multimodal.eval_scenes=40
run fsdp 60 torchrun --nproc_per_node=1 -m nanogpt4 pretrain --device cuda --out /tmp/gpu_fsdp \
    data.max_bytes=20000000 training.fsdp=true training.activation_checkpointing=true training.max_steps=40 \
    training.eval_interval=20 --json
# the real training loop at 124M shape (tiny's tokenizer), compiled: its own tok/s and MFU (published peak)
run pretrain 150 $PY -m nanogpt4 pretrain --device cuda --out /tmp/gpu_pretrain data.max_bytes=20000000 \
    model.dim=768 model.n_layers=12 model.n_heads=12 model.max_seq_len=1024 training.batch_size=16 \
    training.compile=true training.max_steps=60 training.eval_interval=60 --json
cp /tmp/gpu_pipeline/report.md "$OUT/pipeline_report.md" 2>/dev/null
tar czf "$OUT/results.tgz" benchmarks/results/*cuda* /tmp/gpu_pipeline/*/summary.json /tmp/gpu_fsdp/summary.json \
    /tmp/gpu_pretrain/summary.json 2>/dev/null
ls -la "$OUT"

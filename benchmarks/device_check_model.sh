set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nproc; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 - <<'PY'
import torch, transformers
from bert_demo.model import load_pretrained
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
hf = transformers.BertModel(cfg); hf.save_pretrained("/tmp/minilm_shape")
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
ours = load_pretrained("/tmp/minilm_shape").cuda().eval(); hf = hf.cuda().eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(1000, 30000, (16, 32), generator=g); mask = torch.ones_like(ids); mask[::4, 16:] = 0; ids[mask == 0] = 0
ids, mask = ids.cuda(), mask.cuda()
with torch.no_grad():
    a = ours(ids, mask); b = hf(input_ids=ids, attention_mask=mask)
print("cuda fp32 parity: hidden", (a.last_hidden_state - b.last_hidden_state).abs().max().item(), "pooler", (a.pooler_output - b.pooler_output).abs().max().item())
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    c = ours(ids, mask)
print("bf16 autocast finite:", torch.isfinite(c.last_hidden_state).all().item(), "max diff vs fp32", (c.last_hidden_state.float() - a.last_hidden_state).abs().max().item())
ours.train(); out = ours(ids, mask); out.pooler_output.sum().backward(); print("cuda backward ok", ours.layers[0].attention.qkv.weight.grad.norm().item())
PY
taskset -c 0,1 python3 benchmarks/bench_model.py --model /tmp/minilm_shape --threads 2 --repeats 21 2>&1 | grep -v "Loading weights"
taskset -c 0 python3 benchmarks/bench_model.py --model /tmp/minilm_shape --threads 1 --repeats 21 2>&1 | grep -v "Loading weights"
python3 benchmarks/bench_model.py --model /tmp/minilm_shape --device cuda --repeats 51 2>&1 | grep -v "Loading weights"

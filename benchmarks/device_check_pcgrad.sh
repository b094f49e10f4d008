# PCGrad on a CUDA machine: the CUDA tests, then the benchmark in both settings
# (with the profiler breakdown), then a larger batch. Run from the repo root.
# torchjd is optional: the benchmark skips its row without it. It is pure Python,
# so it can travel as a copy of the installed package, e.g.
#   mkdir -p .pcgrad_gpu/site && cp -r .venv/lib/python3.11/site-packages/torchjd .pcgrad_gpu/site/
#   (with /.pcgrad_gpu/ in .git/info/exclude, and carried to the device machine)
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.pcgrad_gpu/site:$PWD
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 60 python3 -m pytest tests/test_pcgrad.py -q -p no:cacheprovider -k "cuda or matches_flat" 2>&1 | tail -4
timeout 120 python3 benchmarks/bench_pcgrad.py --device cuda --repeats 15 --breakdown 2>&1 | grep -v USDT
timeout 40 python3 benchmarks/bench_pcgrad.py --device cuda --repeats 10 --batch 32 --tokens 128 --settings separate --no-memory 2>&1 | grep -v USDT

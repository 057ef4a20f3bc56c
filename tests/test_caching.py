"""Inductor's FX graph cache and AOTAutograd cache across processes: a second process start reuses the cached
compiled graphs (hits, not misses), and runs them correctly (no stale rewrite of the op)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, math, torch
    from torch._dynamo.utils import counters

    def attention(q, k, v):
        n = q.size(-2)
        hidden = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 16, requires_grad=True) for _ in range(3))
    # force: the CPU's cost model would keep attention this small unfused; the cached graphs must hold the op
    compiled = torch.compile(attention, backend="flash_fx", options={"report": False, "force": True})
    out = compiled(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = attention(q, k, v)
    expected.sum().backward()
    error = max(float((a - b).abs().max()) for a, b in zip([out, *grads], [expected, q.grad, k.grad, v.grad]))
    import flash_fx
    assert [r.variant for report in flash_fx.reports() for r in report.rewrites] == ["causal"]
    print(json.dumps({"error": error, "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])}))
""")


def run_once(cache_dir):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_caches(tmp_path):
    first = run_once(tmp_path)
    second = run_once(tmp_path)
    assert first["error"] < 1e-5 and second["error"] < 1e-5
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_hit", 0) + second["aot"].get("autograd_cache_hit", 0) >= 1, second
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second

"""torch.compile and CUDA graphs over the IP-Adapter hook and the fused kernel's custom operators.

Here (CPU): a small SD1.5-structured UNet (16 cross-attention layers) with an IP-Adapter hook
compiles with ``fullgraph=True``, so any graph break raises; backend "eager" runs dynamo's graph
op for op, so a compiled step gives the eager step's bits. The fused route (dispatching as on an
sm_80 GPU, the kernel through the Triton interpreter) puts one custom-operator node in the graph
per call; ``torch.library.opcheck`` checks the operators' fake implementations against the real.

GPU only (skipped here): the compiled UNet on CUDA, and a denoising step captured in a
``torch.cuda.CUDAGraph`` and replayed.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import kernel_spy
from ipadapter_min.kernels import decoupled_attention
from ipadapter_min.models.configs import UNetConfig
from ipadapter_min.ip_adapter.adapter import IPAdapterLayers
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
from ipadapter_min.ip_adapter.several import ImagePrompts
from ipadapter_min.models.unet import UNet

dispatch = importlib.import_module("ipadapter_min.kernels.decoupled_attention")  # the module, not the function
FUSED_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
TOKEN_WIDTH = 48

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # torch.compile tracing


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_unet(cfg: UNetConfig, device="cpu", dtype=torch.float32) -> UNet:
    torch.manual_seed(0)
    return UNet(cfg).eval().to(device=device, dtype=dtype)


def adapter_hook(widths, scale=0.7, seed=1, device="cpu", dtype=torch.float32, **options) -> ImagePromptAttention:
    """A base IP-Adapter's hook with random layers of ``widths`` and 4 positive and 4 negative image tokens."""
    torch.manual_seed(seed)
    layers = IPAdapterLayers(widths=widths, context_dim=TOKEN_WIDTH).to(device, dtype)
    positive, negative = (torch.randn(1, 4, TOKEN_WIDTH).to(device, dtype) for _ in range(2))
    return ImagePromptAttention(layers, positive, negative, scale, **options)


def step_inputs(seed: int, size=8, context_dim=32, device="cpu", dtype=torch.float32):
    """A CFG batch (2 rows): latents, a timestep, text embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g).to(device, dtype)
    context = torch.randn(2, 7, context_dim, generator=g).to(device, dtype)
    return x, torch.tensor(900.0 - 100 * seed, device=device), context


def op_nodes(graph: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in graph.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("ipadapter_min.")]


class Graphs:
    """A dynamo backend that keeps each graph it is given and runs it as traced (eagerly)."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


# ----------------------------------------------------------------------------------------------
# CPU: no graph breaks


def test_the_hooked_unet_compiles_without_graph_breaks():
    """A denoising step as the pipeline drives it (set_step before the UNet call), the hook's
    image K/V cached by an earlier step as in every step but the first: the whole step in one
    graph, the eager bits. (Each trace of the SD1.5-structured UNet takes 25-60 s on one core, so
    the first step's K/V computation is traced on the hook alone, in the next test.)"""
    unet = small_unet(UNetConfig(channels=16, groups=8, heads=2, context_dim=32))
    widths = unet.cross_attention_widths()
    eager_hook, compiled_hook = adapter_hook(widths), adapter_hook(widths)
    counter = CompileCounter()
    compiled = torch.compile(unet, fullgraph=True, backend=counter)
    with torch.no_grad():
        for step in range(2):
            x, t, context = step_inputs(step)
            for hook in (eager_hook, compiled_hook):
                hook.set_step(step, 2, float(t))
            expected = unet(x, t, context, hook=eager_hook)
            run = compiled if step else unet  # step 0 fills the cache eagerly
            assert torch.equal(run(x, t, context, hook=compiled_hook), expected), f"step {step}"
    assert counter.frame_count == 1
    # control: the adapter acted (step 0 differs from the base UNet's output)
    with torch.no_grad():
        x, t, context = step_inputs(0)
        assert not torch.equal(unet(x, t, context), unet(x, t, context, hook=adapter_hook(widths)))


def test_the_hooks_first_step_compiles_without_graph_breaks():
    """The first step's path through the hook (the image K/V projected and cached) in one graph,
    with the eager bits, at every layer width."""
    widths = small_unet(UNetConfig(channels=16, groups=8, heads=2, context_dim=32)).cross_attention_widths()
    eager_hook, compiled_hook = adapter_hook(widths), adapter_hook(widths)
    counter = CompileCounter()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for hook in (eager_hook, compiled_hook):
            hook.set_step(0, 2, 900.0)
        for layer in (0, 2, 4):  # the widths of SD1.5's three levels of cross-attention
            q, k, v = (torch.randn(2, 2, n, widths[layer] // 2, generator=g) for n in (16, 7, 7))
            compiled = torch.compile(lambda q, k, v, layer=layer: compiled_hook(layer, q, k, v), fullgraph=True,
                                     backend=counter)
            assert torch.equal(compiled(q, k, v), eager_hook(layer, q, k, v)), f"layer {layer}"
    assert counter.frame_count == 3


def test_a_graph_break_in_the_hook_fails_the_compile():
    """Control for the test above: fullgraph=True does raise where the hook breaks the graph."""

    class BreakingHook(ImagePromptAttention):
        def __call__(self, layer, q, k, v):
            torch._dynamo.graph_break()
            return super().__call__(layer, q, k, v)

    unet = small_unet(UNetConfig(channels=16, groups=8, heads=2, context_dim=32))
    hook = adapter_hook(unet.cross_attention_widths())
    hook.__class__ = BreakingHook
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(unet, fullgraph=True, backend="eager")(*step_inputs(0), hook=hook)


def test_the_device_question_is_answered_outside_the_trace(monkeypatch):
    """On a GPU the first call may come under torch.compile: dynamo must call ``_fused_device``,
    not trace into it (torch.cuda's capability query and triton's import would break the graph).
    Here the capability query breaks any graph it is traced into, and the compile holds."""
    def capability(device):
        torch._dynamo.graph_break()  # a no-op when not traced
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(dispatch, "_FUSED_DEVICES", {})
    gpu = torch.device("cuda", 0)
    out = torch.compile(lambda x: x + dispatch._fused_device(gpu), fullgraph=True, backend="eager")(torch.zeros(()))
    assert out == 1 and dispatch._FUSED_DEVICES == {gpu: True}


# ----------------------------------------------------------------------------------------------
# CPU: the fused route under torch.compile, through the Triton interpreter


@pytest.fixture
def fused_route(monkeypatch) -> list[kernel_spy.KernelLaunches]:
    """Dispatch as on an sm_80+ GPU: only the device question (``_fused_device``) is answered yes;
    the dispatcher's other checks run, traced by dynamo. Returns spies on the two kernels' launches
    (one image branch, several)."""
    module = dispatch._triton()
    monkeypatch.setattr(dispatch, "_fused_device", lambda device: True)
    branches = kernel_spy.KernelLaunches(module._decoupled_attention_branches_kernel)
    monkeypatch.setattr(module, "_decoupled_attention_branches_kernel", branches)
    return [kernel_spy.spy_on_kernel(monkeypatch), branches]


def layer_inputs(heads=2, head_dim=40, queries=33, seed=0):
    """q, k, v as the UNet makes them: (B, L, H·d) projections viewed as (B, H, L, d)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, heads * head_dim, generator=g).view(2, n, heads, head_dim).transpose(1, 2)
                 for n in (queries, 7, 7))


def test_the_fused_route_compiles_to_one_operator_per_call(fused_route):
    """The hook's plain path, several adapters (the branches path) and a tensor λ each compile to
    one graph holding one custom-operator node, whose run launches the kernel once and gives the
    eager fused call's bits; the output keeps q's memory layout (the fake said so while tracing)."""
    q, k, v = layer_inputs()
    widths = [q.shape[1] * q.shape[3]] * 16
    one = adapter_hook(widths)
    several = ImagePrompts([adapter_hook(widths, seed=2), adapter_hook(widths, scale=-0.4, seed=3)])
    k_img, v_img = (t[:, :, :4] for t in layer_inputs(seed=1)[1:])
    cases = [("ipadapter_min.decoupled_attention.default", 0, lambda q, k, v: one(0, q, k, v)),
             ("ipadapter_min.decoupled_attention_branches.default", 1, lambda q, k, v: several(0, q, k, v)),
             ("ipadapter_min.decoupled_attention_tensor_scale.default", 0,
              lambda q, k, v: decoupled_attention(q, k, v, k_img, v_img, torch.tensor(0.7)))]
    for op, kernel, call in cases:
        launches = fused_route[kernel]
        graphs = Graphs()
        with torch.no_grad():
            out = torch.compile(call, fullgraph=True, backend=graphs)(q, k, v)
            launched = len(launches)
            expected = call(q, k, v)
        (graph,) = graphs.graphs
        assert op_nodes(graph) == [op]
        assert launched == 1 and len(launches) == 2, op
        launches.launches.clear()
        assert torch.equal(out, expected), op
        assert out.stride() == q.stride()
    # control: the branches carry both adapters (dropping one changes the result)
    assert not torch.equal(several(0, q, k, v), several.hooks[0](0, q, k, v))


def test_the_operators_fake_implementations_pass_opcheck():
    """torch.library.opcheck on CPU tensors in the UNet's layout (the kernel through the
    interpreter): schema, autograd registration, fake vs real output (shape, dtype, strides), and
    AOT dispatch with dynamic shapes."""
    ops = importlib.import_module("ipadapter_min.kernels.triton_decoupled_attention")
    q, k, v = layer_inputs(queries=17)
    k_img, v_img = (t[:, :, :4] for t in layer_inputs(seed=1)[1:])
    mask = torch.rand(17, 1, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(ops.decoupled_attention_op, (q, k, v, k_img, v_img, 0.7))
    torch.library.opcheck(ops.decoupled_attention_tensor_scale_op, (q, k, v, k_img, v_img, torch.tensor(0.7)))
    torch.library.opcheck(ops.decoupled_attention_branches_op,
                          (q, k, v, [k_img, k_img[:, :, :2]], [v_img, v_img[:, :, :2]], [0.7, -0.4], [None, mask]))
    # the fake keeps q's (B, L, H·d) layout underneath, as the kernel's output does
    meta = ops.decoupled_attention_op(*(t.to("meta") for t in (q, k, v, k_img, v_img)), 0.7)
    assert meta.stride() == q.stride() and not meta.is_contiguous()


# ----------------------------------------------------------------------------------------------
# GPU only

GPU_UNET = UNetConfig(channels=80, groups=8, heads=2, context_dim=32)  # SD1.5's head dims 40/80/160


@pytest.mark.skipif(not FUSED_GPU, reason="the fused kernel needs an sm_80+ GPU")
def test_the_compiled_unet_runs_the_fused_operator_on_a_gpu():
    """fullgraph on CUDA with the real dispatch (the cached capability query is a constant to
    dynamo); aot_eager runs the fake implementations under AOT autograd. Each of the 16 layers is
    one operator node; fp16 result within 1e-2 of eager (the same kernels, so normally equal)."""
    unet = small_unet(GPU_UNET, "cuda", torch.float16)
    hook = adapter_hook(unet.cross_attention_widths(), device="cuda", dtype=torch.float16)
    x, t, context = step_inputs(0, size=16, device="cuda", dtype=torch.float16)
    graphs = Graphs()
    with torch.no_grad():
        expected = unet(x, t, context, hook=hook)  # fills the hook's image K/V cache
        out = torch.compile(unet, fullgraph=True, backend=graphs)(x, t, context, hook=hook)
    (graph,) = graphs.graphs
    assert op_nodes(graph) == ["ipadapter_min.decoupled_attention.default"] * 16
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    out = torch.compile(unet, fullgraph=True, backend="aot_eager")(x, t, context, hook=hook)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not FUSED_GPU, reason="CUDA graphs of the fused kernel need an sm_80+ GPU")
def test_a_denoising_step_replays_as_a_cuda_graph(monkeypatch):
    """One UNet call with the hook (fp16, CFG batch) captured in a torch.cuda.CUDAGraph: the 16
    fused launches are recorded at capture (λ a Python float: no host sync, no copy), replays run
    no Python, and a replay on new latents and timestep gives the eager step on them (fp16, within
    1e-2: the same kernels, so normally equal)."""
    launches = kernel_spy.spy_on_kernel(monkeypatch)
    unet = small_unet(GPU_UNET, "cuda", torch.float16)
    hook = adapter_hook(unet.cross_attention_widths(), device="cuda", dtype=torch.float16)
    x, t, context = step_inputs(0, size=16, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up: Triton compiles, the hook caches image K/V
        for _ in range(2):
            unet(x, t, context, hook=hook)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before = len(launches)
    with torch.no_grad(), torch.cuda.graph(graph):
        out = unet(x, t, context, hook=hook)
    assert len(launches) - before == 16
    for seed in (1, 2):
        new_x, new_t, _ = step_inputs(seed, size=16, device="cuda", dtype=torch.float16)
        x.copy_(new_x)
        t.copy_(new_t)
        captured = len(launches)
        graph.replay()
        assert len(launches) == captured
        replayed = out.clone()
        with torch.no_grad():
            expected = unet(new_x, new_t, context, hook=hook)
        torch.testing.assert_close(replayed, expected, rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # control: the adapter acts in the replayed step
        assert not torch.equal(replayed, unet(x, t, context))

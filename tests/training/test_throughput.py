"""FLOP counting must leave torch.compile working for the rest of a run."""

import torch

from mmtrain.training.throughput import count_flops, mfu


def test_count_flops_counts_eagerly_and_leaves_the_compiled_region_to_compile_afterwards():
    compiled_graphs, compiled_runs = [], []

    def counting_backend(graph_module, example_inputs):
        compiled_graphs.append(graph_module)

        def run(*args):
            compiled_runs.append(1)
            return graph_module(*args)

        return run

    weight = torch.randn(8, 6, dtype=torch.float64)

    @torch.compile(backend=counting_backend)
    def layer(x):
        return torch.tanh(x @ weight)

    x = torch.randn(4, 8, dtype=torch.float64)
    torch._dynamo.reset()
    flops, out = count_flops(lambda: layer(x))
    assert flops == 2 * 4 * 8 * 6  # one (4, 8) @ (8, 6) matmul
    torch.testing.assert_close(out, torch.tanh(x @ weight), rtol=0, atol=0)
    assert compiled_graphs == []  # the counted call ran eagerly
    for _ in range(3):
        torch.testing.assert_close(layer(x), torch.tanh(x @ weight), rtol=0, atol=0)
    # torch 2.11 marked the region "skip" for good after a first call under the counter: no graph, no runs
    assert len(compiled_graphs) == 1 and len(compiled_runs) == 3
    torch._dynamo.reset()


def test_mfu_is_flops_per_second_over_the_peak():
    assert mfu(1e12, 0.5, 4e12) == 0.5
    assert mfu(None, 0.5, 4e12) is None

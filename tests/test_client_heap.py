"""A domain node's matrices go back to the system when freed: its aggregator client keeps only chunk buffers on the heap."""

import json
import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the allocator policy is process-wide and the first caller sets it
# (an aggregator started earlier in this test process would have set its own).
_PROBE = textwrap.dedent(
    r"""
    import asyncio, json, sys
    from pathlib import Path
    import numpy as np
    from cdimf.common.rpc.aggregator_client import AggregatorClient
    from cdimf.common.wire.chunks import MatrixAssembler, encode_matrix_serialized
    from cdimf.protos.v1 import federation_pb2 as pb

    def resident() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise KeyError("VmRSS")

    async def construct() -> None:
        # what a node does first: its client (which sets the allocator policy); nothing is dialled
        await AggregatorClient("127.0.0.1:9", "d0").close()

    asyncio.run(construct())
    rows, rank = int(sys.argv[1]), int(sys.argv[2])
    sent = np.random.default_rng(0).standard_normal((rows, rank), dtype=np.float32)
    # the chunks as they arrive (kept: they are not what is measured), then a baseline
    chunks = list(encode_matrix_serialized(sent, pb.Header(run_id="r", domain="", round=1)))
    before = resident()
    # a round's main-thread matrices, as the node makes them: a pulled Z assembled from its
    # chunks, then the dual step's new duals; a later round drops that Z while the duals made
    # after it live on (on a heap, the freed Z lies under them)
    assembler = MatrixAssembler("consensus", expected_rows=rows)
    for message in chunks:
        assembler.add_serialized(message)
    z, _ = assembler.result()
    duals = np.add(sent, z, dtype=np.float32)
    assert np.array_equal(z, sent)
    held = resident()
    del assembler, z
    after = resident()
    assert duals.shape == (rows, rank)
    print(json.dumps({"before": before, "held": held, "after": after}))
    """
)


def test_a_nodes_freed_matrix_leaves_its_resident_memory() -> None:
    """A pulled Z freed while the duals made after it live on: resident memory falls back to about the duals alone.

    With the aggregator's policy (everything under 1 GiB from the heap) a freed matrix under a
    live one stayed resident: the node's peak carried such matrices (2.3x implicit's at 1M users).
    """
    rows, rank = 200_000, 64
    matrix_bytes = rows * rank * 4
    done = subprocess.run([sys.executable, "-c", _PROBE, str(rows), str(rank)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    # both matrices were resident while held (each page written): the probe measures what it means to
    assert sizes["held"] - sizes["before"] > 1.5 * matrix_bytes, sizes
    # Z freed: the duals' matrix and at most a quarter of another (chunk buffers, allocator slack)
    assert sizes["after"] - sizes["before"] < matrix_bytes + matrix_bytes // 4, sizes

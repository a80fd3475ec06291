import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from masklab.objectives import KeyQueue, concat_all_gather, infonce_loss


def test_infonce_by_hand():
    q = torch.tensor([[2.0, 0.0]])  # normalised inside: (1, 0)
    k = torch.tensor([[1.0, 1.0]])  # cos 1/sqrt2
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # cos 0 and -1
    t = 0.5
    terms = [math.exp(c / t) for c in (1 / math.sqrt(2), 0.0, -1.0)]
    assert infonce_loss(q, k, queue, t).item() == pytest.approx(-math.log(terms[0] / sum(terms)), rel=1e-6)


def test_infonce_takes_no_gradient_through_the_key():
    q, k = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    infonce_loss(q, k, torch.randn(5, 4)).backward()
    assert q.grad is not None and k.grad is None


def test_infonce_shapes_are_named():
    with pytest.raises(ValueError, match=r"queue \(5, 3\) must be \(K, 4\)"):
        infonce_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(5, 3))


def test_queue_is_fifo_with_the_configured_size():
    queue = KeyQueue(5, 2)
    assert queue.keys.shape == (5, 2) and int(queue.ptr) == 0
    keys = torch.stack([torch.tensor([1.0, float(i)]) for i in range(12)])
    pushed = []
    for chunk in keys.split(3):  # 3 keys at a time through a queue of 5: the pointer wraps
        queue.push(chunk)
        pushed += chunk.tolist()
    # The queue holds the last five keys (normalised), oldest at the pointer.
    last = torch.nn.functional.normalize(torch.tensor(pushed[-5:]), dim=1)
    order = [(int(queue.ptr) + i) % 5 for i in range(5)]
    torch.testing.assert_close(queue.keys[order], last)
    assert int(queue.ptr) == 12 % 5


def test_pushing_more_keys_than_the_queue_holds_equals_pushing_them_one_by_one():
    a, b = KeyQueue(4, 3), KeyQueue(4, 3)
    b.keys.copy_(a.keys)
    keys = torch.randn(7, 3)
    a.push(keys)
    for key in keys:
        b.push(key[None])
    torch.testing.assert_close(a.keys, b.keys)
    assert int(a.ptr) == int(b.ptr) == 3


def test_queue_is_in_the_state_dict():
    assert set(KeyQueue(4, 2).state_dict()) == {"keys", "ptr"}
    with pytest.raises(ValueError, match="queue size must be positive, got 0"):
        KeyQueue(0, 2)


def test_gather_is_the_identity_in_one_process():
    x = torch.randn(3, 2)
    assert concat_all_gather(x) is x


def _two_ranks(rank: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29547")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue = KeyQueue(6, 2)
        queue.push(torch.eye(2)[rank].expand(2, 2))  # rank 0 pushes two (1, 0), rank 1 two (0, 1)
        torch.save({"keys": queue.keys[:4], "ptr": queue.ptr}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_enqueue_every_ranks_keys_in_rank_order(tmp_path):
    mp.spawn(_two_ranks, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0["keys"], r1["keys"])
    assert int(r0["ptr"]) == 4
    torch.testing.assert_close(r0["keys"], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))

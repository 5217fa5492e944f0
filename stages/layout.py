"""The order in which stages.model.GPT runs its blocks, and where its parallel lanes may run. Plain Python (no
torch), so the plan-time checks (stages.checks) share it with the model."""


def layer_order(num_layers: int, recur_layers: list, recur_loops: int, recurring: bool = True) -> list[int]:
    """The blocks in the order they run: with depth recurrence on, layers a..b run recur_loops extra times,
    e.g. 11 layers, [3, 5], 2 loops: 0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10."""
    order = list(range(num_layers))
    if recurring and recur_layers:
        a, b = recur_layers
        order[b + 1:b + 1] = list(range(a, b + 1)) * recur_loops
    return order


def halves(order: list[int]) -> tuple[list[int], list[int]]:
    """(encoder, decoder) of the U-Net: the first half of the order and the rest (the longer one when odd)."""
    return order[: len(order) // 2], order[len(order) // 2:]


def parallel_problem(num_layers: int, parallel_from: int, recur_layers: list, recur_loops: int) -> str | None:
    """Why parallel_from cannot run as the record #1855 runs it, or None. Its lanes start at the first decoder
    layer >= parallel_from and last to the end, so those layers must all be in the decoder, after its other
    layers, with depth recurrence off and on."""
    if parallel_from < 0:
        return None
    for recurring in (False, True):
        encoder, decoder = halves(layer_order(num_layers, recur_layers, recur_loops, recurring))
        lanes = [i >= parallel_from for i in decoder]
        if any(i >= parallel_from for i in encoder) or lanes != sorted(lanes):
            return (f"the layers from {parallel_from} on must end the decoder (encoder {encoder}, "
                    f"decoder {decoder}{' with recurrence' if recurring and recur_layers else ''})")
    return None

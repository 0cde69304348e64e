"""perl.verl_glue.trainer.actor_fields: what the actor fetches from TransferQueue (no Ray: TransferQueue's
client stands in; the end-to-end tests run it inside verl's trainer)."""


def test_the_actor_is_handed_the_tensor_fields_and_multi_modal_inputs_only(monkeypatch):
    """`actor_fields`: inside the context the batch names its tensor fields, and multi_modal_inputs
    for a multimodal model (from TransferQueue's schema of those keys), not the bookkeeping;
    afterwards the batch's own list again."""
    import transfer_queue as tq
    from transfer_queue.metadata import KVBatchMeta

    from perl.verl_glue.trainer import actor_fields

    schema = {"input_ids": {"is_non_tensor": False}, "responses": {"is_non_tensor": False},
              "old_log_probs": {"is_non_tensor": False}, "multi_modal_inputs": {"is_non_tensor": True},
              "raw_prompt": {"is_non_tensor": True}, "reward_model": {"is_non_tensor": True},
              "tools_kwargs": {"is_non_tensor": True}}
    asked = []

    class Client:
        def kv_retrieve_meta(self, keys, partition_id, create=False):
            asked.append((list(keys), partition_id))
            return type("Meta", (), {"field_schema": schema})()

    monkeypatch.setattr(tq, "get_client", lambda: Client())
    batch = KVBatchMeta(keys=["u1_0_0", "u1_1_0"], tags=[{}, {}], partition_id="train")
    with actor_fields(batch, multimodal=True):
        assert sorted(batch.fields) == ["input_ids", "multi_modal_inputs", "old_log_probs", "responses"]
    assert batch.fields is None and asked == [(["u1_0_0", "u1_1_0"], "train")]
    with actor_fields(batch, multimodal=False):  # no processor: verl's agent loop left them empty
        assert sorted(batch.fields) == ["input_ids", "old_log_probs", "responses"]
    assert batch.fields is None
    # what verl's kv_batch_put returns: a batch naming every field its keys hold; the actor gets the
    # tensor ones among them, and the batch its own list back
    named = KVBatchMeta(keys=["u1_0_0"], tags=[{}], partition_id="train",
                        fields=["raw_prompt", "input_ids", "old_log_probs", "multi_modal_inputs"])
    with actor_fields(named, multimodal=False):
        assert named.fields == ["input_ids", "old_log_probs"]
    assert named.fields == ["raw_prompt", "input_ids", "old_log_probs", "multi_modal_inputs"] and len(asked) == 3

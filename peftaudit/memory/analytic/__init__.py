"""The analytic estimate: one training step replayed on symbolic tapes, in microseconds.

Where a layer's activation bytes come from, in the order the code runs:

1. :mod:`.estimate` — :func:`peftaudit.memory.estimate`: resolves the method's
   adaptation, picks the layer program, records the step once per plan shape
   and evaluates it for the batch and sequence;
2. :mod:`.programs` — the layer program registered for the model's
   ``model_type`` (``llama``, ``gpt2``, ``bert``; others replay Llama's program
   at their own sizes, with a warning);
3. :mod:`.shape` and :mod:`.layout` — the numbers the program runs with
   (:class:`~.shape.ModelShape`) and the answers to its questions about each
   linear layer and weight under the method (:class:`~.layout.ModelLayout`);
4. :mod:`.step` — records embedding, layers and head on tapes, forward and
   backward, with gradient checkpointing;
5. :mod:`.ops` and :mod:`.linear` — each operation with PyTorch's saving rules
   (linear layers with peft adapters and bitsandbytes weights);
6. :mod:`.tape` — the symbolic tape: allocations, what autograd saves, the
   backward replay, sizes as linear forms in tokens.

Static memory (weights, gradients, optimizer states) is :mod:`.static`, divided
across GPUs by :mod:`.sharding`. The oracle this is tested against is
:mod:`peftaudit.memory.tracing`.
"""

"""The contract between the peft-kernel core and its plugins.

Every hook a plugin may implement is declared here, and each docstring is the authoritative
description of when the core calls it, what it passes and what it expects back. Implement a hook
with ``@peft_kernel.hookimpl`` on a function (or a method of an object) with the same name and a
subset of the same argument names, then expose the module or object through the ``peft_kernel``
entry-point group::

    [project.entry-points.peft_kernel]
    mymethod = "peft_kernel_mymethod.plugin"

Hooks marked *first result* stop at the first implementation that returns something other than
``None``; plugins return ``None`` for any config or layer that is not theirs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

from peft_kernel.markers import hookspec

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import argparse

    import pluggy
    import torch
    from torch import nn

    from peft_kernel.config import PeftConfig
    from peft_kernel.host import AdapterHost
    from peft_kernel.layer import AdapterLayer
    from peft_kernel.records import BackendRecord, MethodRecord


class PeftKernelSpecs:
    """Hook specifications of peft-kernel (grouped in a class so pluggy can add them at once)."""

    @hookspec
    def peft_kernel_register_methods(self, register: Callable[[MethodRecord], None]) -> None:
        """Register the PEFT methods this plugin provides.

        Called once when the plugin manager is built. Call ``register(record)`` once per method,
        with a :class:`peft_kernel.records.MethodRecord` giving the ``peft_type`` string written in
        ``adapter_config.json`` (``"LORA"``), the config class, the state-dict prefix that marks the
        method's parameters (``"lora_"``), and its capabilities (``mergeable``, ``mixed_batch``,
        ``hotswap``, ``prompt_learning``, ``additive``, ``task_ids``...; ``records.CAPABILITIES``
        documents them). Two plugins registering the same ``peft_type``,
        config class name or prefix make the manager raise an error naming both distributions.

        Keep this cheap: import the config class here, never torch-heavy layer code.
        """

    @hookspec
    def peft_kernel_register_backends(self, register: Callable[[BackendRecord], None]) -> None:
        """Register execution backends (export / compile / run targets such as Cloud AI 100).

        Call ``register(record)`` with a :class:`peft_kernel.records.BackendRecord` naming the
        backend, the public classes it exports (``{"QEffAutoLoraModelForCausalLM": "module:attr"}``,
        imported lazily) and a one-line description shown by ``peft-kernel list-plugins``. Two
        backends with the same name raise an error naming both distributions.
        """

    @hookspec
    def peft_kernel_prepare_config(self, config: PeftConfig, model: nn.Module) -> None:
        """Fill in fields of ``config`` that depend on the model, before any module is matched.

        Called once each time an adapter is added (``get_peft_model``, ``add_adapter``,
        ``load_adapter``, ``inject_adapter_in_model``), after the core resolved ``target_modules``
        (model-type defaults, ``"all-linear"``). Mutate ``config`` in place for your own config
        classes only (IA3 resolves ``feedforward_modules`` to its per-architecture default here) and
        raise a :class:`peft_kernel.errors.ConfigError` naming the field when the model leaves it
        undecidable. The return value is ignored; every implementation runs.
        """

    @hookspec
    def peft_kernel_release_config(self, config: PeftConfig, model: nn.Module, remaining: list[PeftConfig]) -> None:
        """Undo what ``peft_kernel_prepare_config`` set up on ``model`` for ``config`` (hooks, state).

        Called when ``config``'s adapter leaves ``model``: after ``delete_adapter`` (``remaining``: the
        configs of the adapters still there) and after ``unload`` / ``merge_and_unload`` (once per
        config, ``remaining`` empty). Act on your own config classes only. The return value is
        ignored; every implementation runs.
        """

    @hookspec(firstresult=True)
    def peft_kernel_match_target(
        self, config: PeftConfig, module_name: str, module: nn.Module, model: nn.Module
    ) -> bool | None:
        """Decide whether ``module`` (at dotted path ``module_name`` inside ``model``) gets an adapter.

        *First result.* The core ships the standard matcher as a ``trylast`` implementation: it
        honours ``target_modules`` (list with suffix matching, a regex string, ``"all-linear"``),
        ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` exactly as HF PEFT does.
        A method with special targeting rules returns ``True`` or ``False`` for its own configs and
        ``None`` for everything else, so the standard matcher still decides for other methods.
        """

    @hookspec(firstresult=True)
    def peft_kernel_create_layer(
        self, config: PeftConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
        shared: dict[str, torch.Tensor],
    ) -> AdapterLayer | None:
        """Build the adapter layer that wraps ``base_layer`` for a new adapter.

        *First result.* Called for every module the matcher selected, unless that module already is
        an :class:`~peft_kernel.layer.AdapterLayer` (then the core calls its ``update_layer`` to add
        the next adapter). Return a new ``AdapterLayer`` subclass instance holding ``base_layer``
        and the parameters of ``adapter_name`` initialised from ``config``, or ``None`` when the
        config is not yours or the layer type is not supported. This is how a third party adds a
        layer type to an existing method (LoRA for ``nn.LSTM``) without touching that method's
        plugin: check ``isinstance(config, LoraConfig)`` and ``isinstance(base_layer, nn.LSTM)``.
        Use ``@hookimpl(tryfirst=True)`` to take over a layer type another plugin's hook handles.
        If every implementation returns ``None``, the core calls the ``layer_factory`` its
        :class:`~peft_kernel.records.MethodRecord` declares for the config's class (so a method
        needs no implementation of this hook, and any implementation runs before the factories);
        if that gives ``None`` too, the core raises an error naming the module.

        ``shared`` holds the adapter's model-level tensors from ``peft_kernel_create_shared_tensors``
        (empty for methods without them; leave the argument out of your implementation then). The
        ``layer_factory`` gets them as ``shared=`` and ``update_layer`` as ``shared=`` too, only when
        there are some.
        """

    @hookspec
    def peft_kernel_adapter_injected(self, config: PeftConfig, model: nn.Module, adapter_name: str) -> None:
        """React to ``adapter_name`` having been added to ``model`` from ``config``.

        Called once each time an adapter is injected (``get_peft_model``, ``add_adapter``,
        ``load_adapter``, ``inject_adapter_in_model``, mixed models), after every adapter layer is in
        place and the ``modules_to_save`` wrappers exist, before the adapter's trainable flags are
        set. For wiring between layers that no single layer factory can see: LoRA's
        ``ensure_weight_tying`` shares the tensors of adapters on tied layers here. Act on your own
        config classes only. The return value is ignored; every implementation runs.
        """

    @hookspec(firstresult=True)
    def peft_kernel_create_parameter_layer(
        self, config: PeftConfig, adapter_name: str, base_layer: nn.Module, module_name: str, parameter_name: str,
    ) -> AdapterLayer | None:
        """Build the adapter layer for the parameter ``parameter_name`` of the module at ``module_name``
        (a parameter target: the config's ``target_parameters`` named ``<module_name>.<parameter_name>``).

        *First result.* ``base_layer`` is the module owning the parameter, or the adapter layer of
        another of its parameters already built (several parameters of one module nest, the later
        parameter outside); the parameter itself is ``getattr(base_of(base_layer), parameter_name)``.
        Return a :class:`~peft_kernel.parameter_layer.ParameterLayer` subclass instance holding
        ``base_layer`` and the parameters of ``adapter_name``, or ``None`` when the config is not
        yours (the core then raises an error naming the parameter). A layer that already adapts the
        parameter gets further adapters through its ``update_layer`` instead, with ``module_name``
        set to ``<module_name>.<parameter_name>`` there and here alike for pattern lookups.
        """

    @hookspec(firstresult=True)
    def peft_kernel_create_shared_tensors(
        self, config: PeftConfig, adapter_name: str, targets: list[tuple[str, nn.Module]]
    ) -> dict[str, torch.Tensor] | None:
        """Create the tensors of a new adapter that belong to no single layer but are shared by all of
        its layers: VeRA's and RandLora's random projections, VB-LoRA's vector bank.

        *First result.* Called once per new adapter, after the targets were matched and before any
        layer is built. ``targets`` are ``(module path, module)`` of every module that gets the
        adapter (a module may already be an adapter layer holding other adapters: use
        :func:`peft_kernel.plugin_api.base_of` for the plain layer and its shapes). Return
        ``{container name: tensor}`` for configs of your method (``None`` for others), e.g.
        ``{"vera_A": A, "vera_B": B}``; raise :class:`~peft_kernel.errors.ConfigError` naming the
        field when the new adapter cannot join the model (before anything is changed).

        The core hands the dict to every layer of the adapter (``layer_factory(..., shared=...)``,
        ``update_layer(..., shared=...)``, this hook's sibling ``peft_kernel_create_layer``), which
        stores each tensor, *the same object* in every layer, in its container of that name, listed
        in the layer class's ``shared_tensor_names`` (a ``ParameterDict`` for trainable tensors, a
        :class:`~peft_kernel.plugin_api.BufferDict` for frozen ones). Then the core saves it once
        under ``<host>.<name>`` (HF PEFT's ``base_model.vera_A``, adapter name stripped), loads it
        into every layer, trains it once (it is one parameter) and deletes it with the adapter. To
        leave it out of checkpoints (VeRA's ``save_projection=False``) drop its key in
        ``peft_kernel_map_state_dict(direction="save")``; it is then rebuilt by this hook on load.
        """

    @hookspec(firstresult=True)
    def peft_kernel_merge(
        self, layer: AdapterLayer, adapter_name: str, safe_merge: bool, direction: Literal["merge", "unmerge"]
    ) -> bool | None:
        """Fold adapter ``adapter_name`` into (``direction="merge"``) or out of (``"unmerge"``) the
        base weights of ``layer``.

        *First result.* The core's ``trylast`` default calls ``layer.merge_into_base`` /
        ``layer.unmerge_from_base``, which additive methods get from ``delta_weight`` and other
        methods override. Implement this hook to merge into base layers the method's own layer
        class cannot write (quantized or sharded weights). With ``safe_merge`` the implementation
        must compute the result out of place and raise ``ValueError`` naming the layer if it is not
        finite, leaving the weights untouched. Return ``True`` once handled.
        """

    @hookspec(firstresult=True)
    def peft_kernel_map_state_dict(
        self,
        config: PeftConfig,
        state_dict: dict[str, torch.Tensor],
        direction: Literal["load", "save"],
    ) -> dict[str, torch.Tensor] | None:
        """Rewrite an adapter's on-disk state dict before loading or after it is built for saving.

        *First result.* ``state_dict`` holds on-disk keys (``base_model.model.<module>.lora_A.weight``,
        adapter name stripped). For ``direction="load"`` return the keys in HF PEFT's format: this
        is where converters from foreign formats (kohya, diffusers) plug in. For ``"save"`` return
        what should be written. Return ``None`` to leave the dict unchanged; the core then maps the
        on-disk keys to the model's parameters itself and rejects any key that matches none.
        """

    @hookspec(firstresult=True)
    def peft_kernel_create_host(
        self, record: MethodRecord, model: nn.Module, config: PeftConfig, adapter_name: str
    ) -> AdapterHost | None:
        """Build the object that owns the adapters of a new ``PeftModel``.

        *First result.* Called once by ``PeftModel(model, config, adapter_name)`` (so by
        ``get_peft_model`` and ``PeftModel.from_pretrained``) after the task's ``modules_to_save``
        were added to ``config``. ``record`` is the :class:`~peft_kernel.records.MethodRecord` of
        ``config``'s method, ``model`` the user's (transformers) model. Return an object that
        follows :class:`peft_kernel.host.AdapterHost` and already holds the adapter
        ``adapter_name`` built from ``config``: the ``PeftModel`` then calls its ``attach(peft_model)``
        once and talks to it through that protocol only (adapters, activation, forward and
        ``generate``, disabling, deleting, merging or refusing to merge, the tensors saved and loaded
        for an adapter, and the user's model back on a failed load).

        The core's ``trylast`` default returns the method's tuner, an
        :class:`~peft_kernel.tuner.AdapterModel` subclass named after ``record.tuner_name``
        (``LoraModel``), which injects adapter layers and becomes ``peft_model.base_model``. A
        family library whose methods do not wrap layers returns its own host for its records (the
        prompt-learning family returns its ``PromptLearner`` for records with the
        ``prompt_learning`` capability; ``peft_model.base_model`` is then the transformers model,
        as in HF PEFT). Return ``None`` for records that are not yours.
        """

    @hookspec
    def peft_kernel_add_hookspecs(self, pm: pluggy.PluginManager) -> None:
        """Add hook specifications of your own (as pytest's ``pytest_addhooks``).

        Called once per plugin while the plugin manager is built, after every plugin was loaded
        and before any ``peft_kernel_register_*`` hook runs, so the added hooks may be implemented
        by any plugin, loaded before or after yours. Call ``pm.add_hookspecs(SpecsClass)`` with a
        class whose methods are marked ``@peft_kernel.hookspec`` (from
        :mod:`peft_kernel.plugin_api`); name them ``peft_kernel_<something>`` and give each a
        docstring that is its contract, as here. Call the hook through
        ``get_registry().call_hook(name, kwargs)``, which isolates failing plugins as for the
        core's hooks. A family library (shared code for several method plugins, registering no
        method itself) uses this to let its methods plug in: the prompt-learning family adds
        ``peft_kernel_create_prompt_encoder``. A plugin implementing a hook whose spec no loaded
        plugin added fails to load with an error naming the hook. The return value is ignored.
        """

    @hookspec(firstresult=True)
    def peft_kernel_convert_for_original_base(
        self,
        config: PeftConfig,
        state_dict: dict[str, torch.Tensor],
        initial_state_dict: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], PeftConfig] | None:
        """Turn a trained adapter whose initialisation changed the base weights (PiSSA, OLoRA) into
        one that works on the *original*, unchanged base model.

        *First result.* Called by ``PeftModel.save_pretrained(...,
        path_initial_model_for_weight_conversion=path)`` once per saved adapter, before
        ``peft_kernel_map_state_dict``. ``config`` is a copy of the adapter's config (yours to
        change); ``state_dict`` the trained adapter's on-disk tensors (``base_model.model.<module>...``,
        adapter name stripped, ``state_dict=`` already applied); ``initial_state_dict`` the tensors
        of the same adapter saved at ``path`` right after initialisation, before training, read by
        the core from that folder with the same keys.

        Return ``(tensors, config)`` to write instead: an adapter that, loaded onto the original base
        model, reproduces the trained model (for LoRA: twice the rank, ``[A; A0]`` and ``[B, -B0]``,
        so ``ΔW = s·(BA - B0A0)``, as HF PEFT writes it), with the config that describes it. Raise
        ``ValueError`` naming the reason for configs you cannot convert. Return ``None`` for configs
        that are not yours; when every implementation returns ``None`` the core raises
        ``ValueError`` saying the method does not support the conversion, as HF PEFT does.
        """

    @hookspec
    def peft_kernel_register_commands(self, subparsers: argparse._SubParsersAction) -> None:
        """Add sub-commands to the ``peft-kernel`` command line.

        Called once each time the CLI builds its parser, after the core's own commands
        (``list-plugins``, ``inspect``). ``subparsers`` behaves as the object argparse's
        ``add_subparsers()`` returns: call ``subparsers.add_parser(name, help=...)`` once per
        command, add its options, and ``set_defaults(func=handler)``. The CLI calls
        ``handler(args)`` with the parsed ``argparse.Namespace`` and exits with the integer it
        returns (``None`` counts as 0). Report bad input by raising
        :class:`peft_kernel.cli.CliError` or a :class:`peft_kernel.errors.PeftKernelError`: the CLI
        prints it as one line, ``peft-kernel <command>: error: ...``, and exits with status 1.

        Keep this hook cheap: it runs for every invocation of ``peft-kernel``, even
        ``peft-kernel list-plugins``, so import torch, transformers and the like inside the
        handler, never here or at the top of the entry module. A command name (or alias) that
        is already taken, by the core or by another plugin, raises ``ValueError``: the plugin is
        then reported as ``failing`` and the other commands keep working. ``peft-kernel-finetune``
        adds ``peft-kernel finetune`` this way. The return value is ignored; every implementation
        runs.
        """

    @hookspec
    def peft_kernel_training_step(self, model: nn.Module, global_step: int) -> None:
        """React to one finished optimizer step of a training loop (AdaLoRA's rank reallocation).

        Called by training loops through ``get_registry().training_step(model, global_step)`` once per
        optimizer step, *after* ``optimizer.step()`` and *before* the gradients are zeroed, so the
        gradients of the step are still on the parameters. ``peft-kernel-finetune``'s ``Trainer``
        calls it from its ``on_optimizer_step`` callback; a hand-written loop calls it itself.
        ``model`` is the model being trained (a ``PeftModel``, or whatever the loop trains: check
        before touching it), ``global_step`` the 0-based index of the step that just finished
        (transformers' ``state.global_step`` before it is incremented). Act only on models holding
        adapters of your method (inspect ``model.peft_config``) and return ``None``; you may change
        adapter tensors in place (under ``torch.no_grad()``) and the adapters' configs. Every
        implementation runs; the return value is ignored.
        """

    @hookspec(firstresult=True)
    def peft_kernel_combine_adapters(
        self,
        config: PeftConfig,
        adapters: list[str],
        configs: list[PeftConfig],
        weights: list[float],
        combination_type: str,
        options: dict[str, Any],
    ) -> tuple[PeftConfig, Callable[[AdapterLayer, str], None]] | None:
        """Say how adapters of your method combine into a new one (HF PEFT's ``add_weighted_adapter``).

        *First result.* Called by ``AdapterModel.add_weighted_adapter(adapters, weights,
        adapter_name, combination_type, ...)`` (reachable from ``PeftModel`` too) after the core
        checked that every name in ``adapters`` exists, that no two of them train a copy of the
        same ``modules_to_save`` module, and that ``adapter_name`` is new. ``config`` is the config
        of ``adapters[0]`` (the call is about its method), ``configs`` the configs of all of
        ``adapters`` in order, ``weights`` one float per adapter (negative ones subtract),
        ``combination_type`` the string the user passed (LoRA: ``"svd"``, ``"linear"``,
        ``"cat"``, ``"ties"``, ``"ties_svd"``, ``"dare_ties"``, ``"dare_linear"``,
        ``"dare_ties_svd"``, ``"dare_linear_svd"``, ``"magnitude_prune"``,
        ``"magnitude_prune_svd"``) and ``options`` the remaining keywords (``svd_rank``,
        ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``, ``density``,
        ``majority_sign_method``). Raise ``ValueError`` for a combination your method does not
        offer or adapters that cannot be combined (LoRA: ``linear`` needs equal ranks), before
        anything is built.

        Return ``(new_config, fill)``. The core injects an adapter ``adapter_name`` with
        ``new_config`` (its targets usually the union of the combined adapters'), leaves it frozen
        and inactive, then calls ``fill(layer, adapter_name)`` for every adapter layer that got
        it; ``fill`` writes the new adapter's tensors from the other adapters present in that layer
        (``peft_kernel.utils.merge_utils`` has the task-arithmetic, TIES, DARE and pruning rules).
        If anything raises, the core deletes the half-built adapter again. Return ``None`` for
        configs that are not yours; when every implementation returns ``None`` the core raises
        :class:`~peft_kernel.errors.UnsupportedFeatureError` saying the method cannot combine
        adapters.
        """

"""``bertexport convert`` as one library call taking its settings record
(``building.settings.ConvertSettings``): the build the settings ask for — a plain conversion
(``building.convert``), a distilled student's, or an early-exit artifact
(``students.early_exit``) — signed when a key is given."""

from __future__ import annotations

from bertexport.building.convert import convert
from bertexport.building.settings import ConvertSettings
from bertexport.core.progress import Reporter


def convert_command(settings: ConvertSettings, reporter: Reporter | None = None):
    """``bertexport convert`` as a library call: the build its settings ask for (a plain
    conversion, a distilled student's, or an early-exit artifact), signed when a key is
    given (the key checked before any work). Returns the build's result (``signature`` set
    when signed); raises like ``convert``."""
    from functools import partial

    s = settings
    if s.sign_key:
        from bertexport.shipping.signing import _key, _library

        _key(s.sign_key, "private key")
        _library()
    build, extra = convert, dict(distill_layers=s.distill_layers, distill_data=s.distill_data,
                                 distill_epochs=s.distill_epochs)
    if s.early_exit_data is not None:
        from bertexport.students.early_exit import EarlyExitConfig, build_early_exit

        build = partial(build_early_exit, data=s.early_exit_data,
                        config=EarlyExitConfig(exit_layers=s.exit_layers, agreement=s.exit_agreement,
                                               threshold=s.exit_threshold))
        extra = {}
    result = build(s.model, s.target, s.out, task=s.task, calib=s.calib, samples=s.samples, text_column=s.text_column,
                   force=s.force, threads=s.threads, latency_runs=s.latency_runs, allow_pickle=s.allow_pickle,
                   trust_remote_code=s.trust_remote_code, revision=s.revision, reporter=reporter, **extra)
    if s.sign_key:
        from bertexport.shipping.signing import sign

        result.signature = sign(result.artifact, s.sign_key)
    return result

"""Online anomaly detection of metric series (River protocol), and its NAB evaluation.

What the anomaly agent calls::

    from streams.anomaly.series import BankConfig, DetectorBank, anomaly_messages, series_key

    bank = DetectorBank.from_settings(settings, is_additive)  # detector, severities, recovery from settings;
    # is_additive(metric_type) -> True for counts/sums: their silent periods are judged as zeros
    # or, after a restart: DetectorBank.from_bytes(saved, BankConfig.from_settings(settings))

    for snapshot in metric_snapshots:                       # schemas.streams.MetricSnapshot, grouped by
        found = bank.process(snapshot)                      # series_key(metric_type, period, dimensions)
        for key, value in anomaly_messages(found):          # -> topic "anomalies"
            ...
    found = bank.close_due(now, settings.stream_grace_seconds)  # on a timer: series that went silent
    saved = bank.to_bytes()                                 # whole state as JSON bytes
    # or per series, for a table keyed by series: bank.series_state(key) / bank.load_series_state(key, data)

Modules: :mod:`~streams.anomaly.base` (the detector protocol), :mod:`~streams.anomaly.seasonal`
(seasonal robust z-score), :mod:`~streams.anomaly.forecast` (River forecaster residuals),
:mod:`~streams.anomaly.likelihood` (anomaly likelihood, the default's calibration),
:mod:`~streams.anomaly.registry` (detectors by name), :mod:`~streams.anomaly.lifecycle`
(fire / update / resolve), :mod:`~streams.anomaly.severity`, :mod:`~streams.anomaly.series`
(the per-series bank) and :mod:`~streams.anomaly.nab` (the NAB score).
"""

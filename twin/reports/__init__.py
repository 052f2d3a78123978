"""Reports (``kind: Report``) and alarm notifications (``kind: NotificationRule``).

- :mod:`twin.reports.model` — what a report holds once its data is gathered;
- :mod:`twin.reports.data` — gather a report's sections from the time-series store and the
  registry (the Dashboard panel vocabulary over the same selectors and queries);
- :mod:`twin.reports.charts`, :mod:`twin.reports.pdf`, :mod:`twin.reports.xlsx`,
  :mod:`twin.reports.csvout` — render PDF (WeasyPrint + matplotlib SVG), XLSX (xlsxwriter),
  CSV;
- :mod:`twin.reports.channels` — deliver: e-mail (SMTP, STARTTLS, auth), webhook (HMAC,
  retries, the scenes' allow-list), MQTT topic, folder (atomic);
- :mod:`twin.reports.runner` — one run: gather, render, store, deliver, record;
- :mod:`twin.reports.service` — the engine service: schedules, missed runs, notifications;
- :mod:`twin.reports.notify` — NotificationRule matching, grouping, throttling, quiet hours,
  escalation, resolved messages.
"""

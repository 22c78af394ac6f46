"""Seeing checkpoint health: per-job figures from the catalog, metrics, reports and a site-wide status.

Everything here is computed from the catalog (rows and job events), so it is
the same on every node and across restarts; only the staging figures (bytes
in use, dumps waiting to be flushed) are read from this node's disks.

- :mod:`.jobstats`: one job's attempts and events, as plain figures;
- :mod:`.metrics`: OpenMetrics text and the node_exporter textfile the runner refreshes;
- :mod:`.report`: ``hpcckpt report``, a page of plots (matplotlib, the ``report`` extra);
- :mod:`.status`: ``hpcckpt status``, which jobs are protected and which need a look.
"""

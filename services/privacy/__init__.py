"""Access to personal data (docs/privacy.md): who may read, export and erase it (roles.py), the audit of
every such request (audit.py), the export and the support read (access.py), the erasure request
(erasure.py), over HTTP (api.py, mounted by the ingestion API) and from `crm privacy` (commands.py)."""

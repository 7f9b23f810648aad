"""The admin API: one servicer per proto service, sharing authentication, RBAC and audit."""

"""The HTTP API: one Klein app per API group, behind one root that routes and guards."""

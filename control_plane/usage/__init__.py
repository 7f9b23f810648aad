"""The usage path (ARCHITECTURE §4): the meter ingests Envoy's usage log into the ledger;
rollups, invoices and the billing outbox follow from the ledger."""

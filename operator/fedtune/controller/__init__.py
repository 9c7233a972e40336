"""The kopf operator: FederatedFineTune resources reconciled into Jobs."""

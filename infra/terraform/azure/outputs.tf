output "orchestrator_principal_id" {
  description = "Object id holding the orchestrator roles."
  value       = local.principal_id
}

output "orchestrator_client_id" {
  description = "Client id of the created managed identity (AZURE_CLIENT_ID, or the AKS annotation azure.workload.identity/client-id); null when principal_id was given."
  value       = var.principal_id == null ? azurerm_user_assigned_identity.orchestrator[0].client_id : null
}

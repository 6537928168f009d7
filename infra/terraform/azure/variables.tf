variable "orchestrator_id" {
  description = "Must equal server.orchestrator_id in the orchestrator config."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}[a-z0-9]$", var.orchestrator_id))
    error_message = "orchestrator_id: lowercase letters, digits and dashes, 2 to 32 characters."
  }
}

variable "resource_group_name" {
  description = "Dedicated resource group the runner VMs, disks and NICs are created in (clouds.azure.resource_group)."
  type        = string
}

variable "subnet_id" {
  description = "Subnet the runner NICs join (clouds.azure.subnet_id)."
  type        = string
}

variable "principal_id" {
  description = "Object id of an existing identity the orchestrator runs as; null creates a user-assigned managed identity."
  type        = string
  default     = null
}

variable "aks_oidc_issuer_url" {
  description = "AKS workload identity: the cluster's OIDC issuer URL; null to skip the federated credential."
  type        = string
  default     = null
}

variable "kubernetes_service_account" {
  description = "AKS workload identity: namespace:name of the orchestrator's Kubernetes service account."
  type        = string
  default     = "orchestrator:orchestrator"
}

variable "tags" {
  description = "Tags added to the identity created here."
  type        = map(string)
  default     = {}
}

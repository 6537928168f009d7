variable "project" {
  description = "Project the runner VMs are created in."
  type        = string
}

variable "orchestrator_id" {
  description = "Must equal server.orchestrator_id in the orchestrator config; VM names start with it."
  type        = string

  validation {
    # Service account ids are limited to 30 characters, "-runner" included.
    condition     = can(regex("^[a-z][a-z0-9-]{0,21}[a-z0-9]$", var.orchestrator_id))
    error_message = "orchestrator_id: starts with a letter; lowercase letters, digits and dashes, 2 to 23 characters."
  }
}

variable "workload_identity_member" {
  description = "GKE Workload Identity member that may act as the orchestrator account, e.g. serviceAccount:PROJECT.svc.id.goog[orchestrator/orchestrator]; null to skip."
  type        = string
  default     = null
}

variable "restrict_to_name_prefix" {
  description = "Add an IAM condition so instances and disks can be created or deleted only when named <orchestrator_id>-*. GCP cannot condition on labels at create time."
  type        = bool
  default     = false
}

variable "orchestrator_id" {
  description = "Must equal server.orchestrator_id in the orchestrator config; every permission is scoped to VMs tagged with it."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}[a-z0-9]$", var.orchestrator_id))
    error_message = "orchestrator_id: lowercase letters, digits and dashes, 2 to 32 characters."
  }
}

variable "name_prefix" {
  description = "Prefix of the IAM role, policy and instance profile names; defaults to the orchestrator_id."
  type        = string
  default     = null
}

variable "trusted_principal_arns" {
  description = "IAM principals (roles, users, accounts) allowed to assume the orchestrator role, e.g. the role of the node or ECS task it runs on."
  type        = list(string)
  default     = []
}

variable "oidc_provider_arn" {
  description = "EKS IRSA: ARN of the cluster's IAM OIDC provider; null to skip."
  type        = string
  default     = null
}

variable "oidc_provider_url" {
  description = "EKS IRSA: issuer URL of that provider without https://, e.g. oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE."
  type        = string
  default     = null
}

variable "kubernetes_service_account" {
  description = "EKS IRSA: namespace:name of the orchestrator's Kubernetes service account."
  type        = string
  default     = "orchestrator:orchestrator"
}

variable "subnet_arns" {
  description = "Subnets runner VMs may be launched in; empty allows any subnet of the account."
  type        = list(string)
  default     = []
}

variable "security_group_arns" {
  description = "Security groups runner VMs may use; empty allows any security group of the account."
  type        = list(string)
  default     = []
}

variable "ami_ssm_parameter_arns" {
  description = "SSM parameters that candidate images name as resolve:ssm:NAME; EC2 reads them with the caller's rights."
  type        = list(string)
  default     = []
}

variable "ebs_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts runner volumes; null when volumes use the AWS-managed key."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags added to the IAM resources created here."
  type        = map(string)
  default     = {}
}

# Two identities:
#   orchestrator account: creates, lists and deletes runner VMs through a custom role.
#   runner account:       attached to runner VMs; it has no roles, because runners
#                         never call Google Cloud for the orchestrator.
# Runners are created with instance_termination_action = DELETE and max_run_duration,
# so an in-guest shutdown or the deadline removes the VM without any permission.

locals {
  prefix = var.orchestrator_id
  # Role ids allow letters, digits, dots and underscores only.
  role_id = "${replace(var.orchestrator_id, "-", "_")}_orchestrator"

  # Instances and disks are name-checked; every other resource type passes.
  name_condition = join(" || ", [
    "(resource.type != \"compute.googleapis.com/Instance\" && resource.type != \"compute.googleapis.com/Disk\")",
    "resource.name.extract(\"/instances/{name}\").startsWith(\"${local.prefix}-\")",
    "resource.name.extract(\"/disks/{name}\").startsWith(\"${local.prefix}-\")",
  ])
}

resource "google_service_account" "orchestrator" {
  project      = var.project
  account_id   = "${local.prefix}-orch"
  display_name = "Runner orchestrator ${var.orchestrator_id}"
}

resource "google_project_iam_custom_role" "orchestrator" {
  project     = var.project
  role_id     = local.role_id
  title       = "Runner orchestrator ${var.orchestrator_id}"
  description = "Create, label, list and delete runner VMs; nothing else."
  permissions = [
    "compute.disks.create",
    "compute.disks.setLabels",
    "compute.images.useReadOnly",
    "compute.instances.create",
    "compute.instances.delete",
    "compute.instances.get",
    "compute.instances.list",
    "compute.instances.setLabels",
    "compute.instances.setMetadata",
    "compute.instances.setServiceAccount",
    "compute.subnetworks.use",
    "compute.subnetworks.useExternalIp",
    "compute.zoneOperations.get",
  ]
}

resource "google_project_iam_member" "orchestrator" {
  project = var.project
  role    = google_project_iam_custom_role.orchestrator.name
  member  = "serviceAccount:${google_service_account.orchestrator.email}"

  dynamic "condition" {
    for_each = var.restrict_to_name_prefix ? [1] : []
    content {
      title       = "only-${local.prefix}-vms"
      description = "Instances and disks named ${local.prefix}-*"
      expression  = local.name_condition
    }
  }
}

resource "google_service_account_iam_member" "workload_identity" {
  count              = var.workload_identity_member != null ? 1 : 0
  service_account_id = google_service_account.orchestrator.name
  role               = "roles/iam.workloadIdentityUser"
  member             = var.workload_identity_member
}

# --- runner account (no roles) ------------------------------------------------

resource "google_service_account" "runner" {
  project      = var.project
  account_id   = "${local.prefix}-runner"
  display_name = "Runner VMs of orchestrator ${var.orchestrator_id} (no roles)"
}

# actAs on this one account only: the orchestrator can attach it to VMs, and no other.
resource "google_service_account_iam_member" "orchestrator_acts_as_runner" {
  service_account_id = google_service_account.runner.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.orchestrator.email}"
}

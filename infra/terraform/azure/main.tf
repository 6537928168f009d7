# Two identities:
#   orchestrator identity: creates, lists and deletes runner VMs, their disks and NICs,
#                          in one dedicated resource group, and joins NICs to one subnet.
#   runner VMs:            get no managed identity at all.
# Azure RBAC cannot condition VM writes on tags, so the resource group is the boundary:
# keep nothing else in it. The orchestrator still touches only VMs tagged with its id.
# An in-guest shutdown leaves an Azure VM stopped but allocated (and billed); the reaper
# deletes such VMs with their disk and NIC on its next pass.

data "azurerm_resource_group" "runners" {
  name = var.resource_group_name
}

locals {
  principal_id = var.principal_id != null ? var.principal_id : azurerm_user_assigned_identity.orchestrator[0].principal_id
}

resource "azurerm_user_assigned_identity" "orchestrator" {
  count               = var.principal_id == null ? 1 : 0
  name                = "${var.orchestrator_id}-orchestrator"
  resource_group_name = data.azurerm_resource_group.runners.name
  location            = data.azurerm_resource_group.runners.location
  tags                = var.tags
}

resource "azurerm_federated_identity_credential" "aks" {
  count               = var.principal_id == null && var.aks_oidc_issuer_url != null ? 1 : 0
  name                = "${var.orchestrator_id}-aks"
  resource_group_name = data.azurerm_resource_group.runners.name
  parent_id           = azurerm_user_assigned_identity.orchestrator[0].id
  issuer              = var.aks_oidc_issuer_url
  subject             = "system:serviceaccount:${var.kubernetes_service_account}"
  audience            = ["api://AzureADTokenExchange"]
}

resource "azurerm_role_definition" "orchestrator" {
  name        = "${var.orchestrator_id} runner orchestrator"
  scope       = data.azurerm_resource_group.runners.id
  description = "Create, list and delete runner VMs with their disks and NICs in this resource group."

  permissions {
    actions = [
      "Microsoft.Compute/disks/delete",
      "Microsoft.Compute/disks/read",
      "Microsoft.Compute/disks/write",
      "Microsoft.Compute/galleries/images/versions/read",
      "Microsoft.Compute/images/read",
      "Microsoft.Compute/locations/operations/read",
      "Microsoft.Compute/virtualMachines/delete",
      "Microsoft.Compute/virtualMachines/instanceView/read",
      "Microsoft.Compute/virtualMachines/read",
      "Microsoft.Compute/virtualMachines/write",
      "Microsoft.Network/locations/operations/read",
      "Microsoft.Network/networkInterfaces/delete",
      "Microsoft.Network/networkInterfaces/join/action",
      "Microsoft.Network/networkInterfaces/read",
      "Microsoft.Network/networkInterfaces/write",
      "Microsoft.Resources/subscriptions/resourceGroups/read",
    ]
    not_actions = []
  }

  assignable_scopes = [data.azurerm_resource_group.runners.id]
}

resource "azurerm_role_assignment" "orchestrator" {
  scope              = data.azurerm_resource_group.runners.id
  role_definition_id = azurerm_role_definition.orchestrator.role_definition_resource_id
  principal_id       = local.principal_id
}

# The subnet usually lives in a network resource group: grant join on it alone.
resource "azurerm_role_definition" "subnet_join" {
  name        = "${var.orchestrator_id} runner subnet join"
  scope       = var.subnet_id
  description = "Attach runner NICs to this subnet."

  permissions {
    actions = [
      "Microsoft.Network/virtualNetworks/subnets/join/action",
      "Microsoft.Network/virtualNetworks/subnets/read",
    ]
    not_actions = []
  }

  assignable_scopes = [var.subnet_id]
}

resource "azurerm_role_assignment" "subnet_join" {
  scope              = var.subnet_id
  role_definition_id = azurerm_role_definition.subnet_join.role_definition_resource_id
  principal_id       = local.principal_id
}

# Two identities:
#   orchestrator role: launches, tags, lists and terminates runner VMs, only its own.
#   runner role:       attached to runner VMs through an instance profile; it has no
#                      permissions, because runners never call AWS for the orchestrator.
# Runners stop themselves from inside the guest; the orchestrator launches them with
# InstanceInitiatedShutdownBehavior=terminate, so a shutdown is a termination.

data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

locals {
  prefix  = coalesce(var.name_prefix, var.orchestrator_id)
  account = data.aws_caller_identity.current.account_id
  ec2_arn = "arn:${data.aws_partition.current.partition}:ec2:*:${local.account}"

  # Resources that RunInstances creates, and therefore tags.
  created = [
    "${local.ec2_arn}:instance/*",
    "${local.ec2_arn}:volume/*",
    "${local.ec2_arn}:network-interface/*",
  ]

  subnets         = length(var.subnet_arns) > 0 ? var.subnet_arns : ["${local.ec2_arn}:subnet/*"]
  security_groups = length(var.security_group_arns) > 0 ? var.security_group_arns : ["${local.ec2_arn}:security-group/*"]
}

# --- orchestrator role --------------------------------------------------------

data "aws_iam_policy_document" "orchestrator_trust" {
  dynamic "statement" {
    for_each = length(var.trusted_principal_arns) > 0 ? [1] : []
    content {
      sid     = "AssumeFromTrustedPrincipals"
      actions = ["sts:AssumeRole"]
      principals {
        type        = "AWS"
        identifiers = var.trusted_principal_arns
      }
    }
  }

  dynamic "statement" {
    for_each = var.oidc_provider_arn != null ? [1] : []
    content {
      sid     = "AssumeFromKubernetesServiceAccount"
      actions = ["sts:AssumeRoleWithWebIdentity"]
      principals {
        type        = "Federated"
        identifiers = [var.oidc_provider_arn]
      }
      condition {
        test     = "StringEquals"
        variable = "${var.oidc_provider_url}:sub"
        values   = ["system:serviceaccount:${var.kubernetes_service_account}"]
      }
      condition {
        test     = "StringEquals"
        variable = "${var.oidc_provider_url}:aud"
        values   = ["sts.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "orchestrator" {
  name                 = "${local.prefix}-orchestrator"
  description          = "Runner orchestrator ${var.orchestrator_id}: manages its own runner VMs only."
  assume_role_policy   = data.aws_iam_policy_document.orchestrator_trust.json
  max_session_duration = 3600
  tags                 = var.tags

  lifecycle {
    precondition {
      condition     = length(var.trusted_principal_arns) > 0 || var.oidc_provider_arn != null
      error_message = "Set trusted_principal_arns or oidc_provider_arn: nobody could assume the orchestrator role."
    }
    precondition {
      condition     = var.oidc_provider_arn == null || var.oidc_provider_url != null
      error_message = "oidc_provider_arn needs oidc_provider_url."
    }
  }
}

data "aws_iam_policy_document" "orchestrator" {
  # Launch only when every created instance, volume and NIC carries our id.
  statement {
    sid       = "RunInstancesOnlyWithOurTag"
    actions   = ["ec2:RunInstances"]
    resources = local.created
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/orchestrator-id"
      values   = [var.orchestrator_id]
    }
  }

  # The other resources a launch references; they are used, not created.
  statement {
    sid     = "RunInstancesReferencedResources"
    actions = ["ec2:RunInstances"]
    resources = concat(
      local.subnets,
      local.security_groups,
      [
        "arn:${data.aws_partition.current.partition}:ec2:*::image/*",
        "${local.ec2_arn}:key-pair/*",
        "${local.ec2_arn}:spot-instances-request/*",
      ],
    )
  }

  # Tags may only be written as part of our own launches.
  statement {
    sid       = "TagOnlyAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = concat(local.created, ["${local.ec2_arn}:spot-instances-request/*"])
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/orchestrator-id"
      values   = [var.orchestrator_id]
    }
  }

  statement {
    sid       = "TerminateOnlyOurInstances"
    actions   = ["ec2:TerminateInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/orchestrator-id"
      values   = [var.orchestrator_id]
    }
  }

  # Describe calls support no resource-level permissions; they only read.
  statement {
    sid = "Inventory"
    actions = [
      "ec2:DescribeAvailabilityZones",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceStatus",
      "ec2:DescribeInstanceTypeOfferings",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeInstances",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeSpotInstanceRequests",
      "ec2:DescribeSpotPriceHistory",
      "ec2:DescribeSubnets",
      "ec2:DescribeTags",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "PassOnlyTheRunnerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.runner.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = length(var.ami_ssm_parameter_arns) > 0 ? [1] : []
    content {
      sid       = "ResolveImageParameters"
      actions   = ["ssm:GetParameters"]
      resources = var.ami_ssm_parameter_arns
    }
  }

  # Encrypted volumes need a grant on the key, and only for EC2's use.
  dynamic "statement" {
    for_each = var.ebs_kms_key_arn != null ? [1] : []
    content {
      sid       = "UseRunnerVolumeKey"
      actions   = ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*"]
      resources = [var.ebs_kms_key_arn]
      condition {
        test     = "Bool"
        variable = "kms:GrantIsForAWSResource"
        values   = ["true"]
      }
    }
  }
}

resource "aws_iam_policy" "orchestrator" {
  name        = "${local.prefix}-orchestrator"
  description = "Launch, tag and terminate runner VMs tagged orchestrator-id=${var.orchestrator_id}."
  policy      = data.aws_iam_policy_document.orchestrator.json
  tags        = var.tags
}

resource "aws_iam_role_policy_attachment" "orchestrator" {
  role       = aws_iam_role.orchestrator.name
  policy_arn = aws_iam_policy.orchestrator.arn
}

# --- runner role (no permissions) ---------------------------------------------

data "aws_iam_policy_document" "runner_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "runner" {
  name                 = "${local.prefix}-runner"
  description          = "Runner VMs of orchestrator ${var.orchestrator_id}; deliberately has no policies."
  assume_role_policy   = data.aws_iam_policy_document.runner_trust.json
  max_session_duration = 3600
  tags                 = var.tags
}

resource "aws_iam_instance_profile" "runner" {
  name = "${local.prefix}-runner"
  role = aws_iam_role.runner.name
  tags = var.tags
}

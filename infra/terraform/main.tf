# The merged-adapter bucket and the IAM role the Ray pods assume through IRSA
# (k8s/base/serviceaccount.yaml, annotated in k8s/overlays/prod). Models and adapters live in
# existing buckets that the job only reads; only the merged bucket is written, and created here.
#
#   terraform init && terraform apply -var-file=my.tfvars     # see terraform.tfvars.example
#
# `terraform validate` needs the AWS provider's schema (downloaded by `terraform init`); the test suite
# runs it where `terraform init -backend=false` succeeds and skips it, saying so, where it cannot
# download providers. `terraform fmt -check` runs everywhere.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}

# --------------------------------------------------------------------------- buckets

resource "aws_s3_bucket" "merged" {
  bucket = var.merged_bucket
}

resource "aws_s3_bucket_public_access_block" "merged" {
  bucket                  = aws_s3_bucket.merged.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "merged" {
  bucket = aws_s3_bucket.merged.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "merged" {
  bucket = aws_s3_bucket.merged.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Versioning: a bad night can be undone object by object; old versions expire (rule 3 below).
resource "aws_s3_bucket_versioning" "merged" {
  bucket = aws_s3_bucket.merged.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "merged" {
  bucket = aws_s3_bucket.merged.id
  # Lifecycle rules on noncurrent versions need versioning in place first.
  depends_on = [aws_s3_bucket_versioning.merged]

  # 1. Multipart uploads that a killed writer never completed.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # 2. Abandoned run prefixes. The job PUTs every object of a run with the object tag
  #    safemerge-state=staged; the commit removes that tag from each of the run's objects before it
  #    writes the run's manifest.json and moves the latest/ pointers. An object still tagged after
  #    some days belongs to a run that crashed or was killed before its commit: no manifest or
  #    pointer names it, so nothing reads it. Committed runs carry no tag and are never touched.
  #    Keep the days well above the longest run (activeDeadlineSeconds in k8s/: 4 h): a run still
  #    committing must not lose its objects. In this versioned bucket, expiry makes the object
  #    noncurrent (a delete marker goes on top); rule 3 then removes it for good.
  rule {
    id     = "expire-abandoned-run-objects"
    status = "Enabled"
    filter {
      tag {
        key   = "safemerge-state"
        value = "staged"
      }
    }
    expiration {
      days = var.staged_expiration_days
    }
  }

  # 3. Old versions (overwritten pointers and run records, expired staged objects), and the delete
  #    markers left with no version behind them.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }
}

# --------------------------------------------------------------------------- IRSA role

locals {
  input_buckets   = [var.models_bucket, var.adapters_bucket]
  service_account = "system:serviceaccount:${var.namespace}:${var.service_account}"
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:sub"
      values   = [local.service_account]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

# What the job does, no more: it lists and reads the models and adapters; in the merged bucket it
# lists, reads (fingerprints, pointers, read-back verification), writes objects with the staged tag
# (PutObject + PutObjectTagging), and removes the tag at commit (DeleteObjectTagging). It deletes
# nothing: abandoned objects go through rule 2 above.
data "aws_iam_policy_document" "access" {
  statement {
    sid       = "ListInputs"
    actions   = ["s3:ListBucket"]
    resources = [for b in local.input_buckets : "arn:aws:s3:::${b}"]
  }
  statement {
    sid       = "ReadInputObjects"
    actions   = ["s3:GetObject"]
    resources = [for b in local.input_buckets : "arn:aws:s3:::${b}/*"]
  }
  statement {
    sid       = "ListMerged"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.merged.arn]
  }
  statement {
    sid = "WriteMergedObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:GetObjectTagging",
      "s3:PutObjectTagging",
      "s3:DeleteObjectTagging",
    ]
    resources = ["${aws_s3_bucket.merged.arn}/*"]
  }

  # The run lock (safemerge_ray/store/lock.py RunLock) is released by deleting it; nothing else is deleted.
  statement {
    sid       = "ReleaseRunLock"
    actions   = ["s3:DeleteObject"]
    resources = ["${aws_s3_bucket.merged.arn}/*status/lock.json"]
  }
}

resource "aws_iam_role" "job" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_role_policy" "access" {
  name   = "${var.name}-s3"
  role   = aws_iam_role.job.id
  policy = data.aws_iam_policy_document.access.json
}

# `safemerge-ray gc` deletes runs that no pointer needs and the leftovers of failed attempts, all under
# runs/, and run records beyond the newest it keeps, under status/history/. The nightly job never needs
# this: attach the policy to the operator's (or a gc CronJob's) role.
data "aws_iam_policy_document" "gc" {
  source_policy_documents = [data.aws_iam_policy_document.access.json]
  statement {
    sid       = "DeleteOldRuns"
    actions   = ["s3:DeleteObject"]
    resources = ["${aws_s3_bucket.merged.arn}/*runs/*", "${aws_s3_bucket.merged.arn}/*status/history/*"]
  }
}

resource "aws_iam_policy" "gc" {
  name        = "${var.name}-gc"
  description = "safemerge-ray gc: the job's access plus deleting unneeded runs and old run records"
  policy      = data.aws_iam_policy_document.gc.json
}
